"""The last stage: encode outcomes, write them to Kafka, Redis or the dead-letter topic, and
settle each record in the ledger only once its write is acknowledged.

Every ticket gets exactly one outcome here. A write that keeps failing is retried with
back-off; a result its reply topic refuses (or keeps refusing past `retry_s`) becomes a dead
letter; a dead letter is retried until the dead-letter topic takes it, since dropping it would
lose the request.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError, MessageSizeTooLargeError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from surge.schemas import ErrorCode, ErrorResponse, InferenceResponse, Status, encode, headers
from surge.schemas.headers import CONTENT_TYPES, JSON, REPLY_TO_REDIS
from surge.workers import metrics
from surge.workers.ledger import Ledger
from surge.workers.tickets import Rejection, Ticket

log = structlog.get_logger("surge.replies")

_RETRY_FIRST_S = 0.05
_RETRY_MAX_S = 2.0
_REDIS_PIPELINE = 512
_GIVE_UP_FACTOR = 5  # dead letters retry this many reply_retry_s before the worker restarts
_DEAD_LETTER_HEADERS = (
    headers.ERROR_CODE,
    headers.ERROR_MESSAGE,
    headers.SOURCE_TOPIC,
    headers.SOURCE_PARTITION,
    headers.SOURCE_OFFSET,
)


@dataclass(slots=True)
class _Write:
    """One record to produce, and the ticket it settles once acknowledged."""

    ticket: Ticket
    topic: str
    value: bytes
    headers: list[tuple[str, bytes | None]]
    dead_letter: bool
    key: bytes = b""
    first_failure: float | None = None  # monotonic time of the first failed attempt
    retry_in: float = _RETRY_FIRST_S

    def __post_init__(self) -> None:
        self.key = self.ticket.key or self.ticket.request_id.encode()  # results join by key


@dataclass(slots=True)
class _Outbox:
    items: deque[Any] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def put(self, item: Any) -> None:
        self.items.append(item)
        self.wake.set()

    async def take(self, limit: int | None = None) -> list[Any]:
        while not self.items:
            self.wake.clear()
            await self.wake.wait()
        count = len(self.items) if limit is None else min(limit, len(self.items))
        return [self.items.popleft() for _ in range(count)]


class Replies:
    def __init__(
        self,
        producer: AIOKafkaProducer,
        redis: Redis | None,
        ledger: Ledger,
        *,
        dead_letter_topic: str,
        redis_ttl_s: int,
        redis_prefix: str,
        retry_s: float,
        on_crash: Callable[[BaseException], None],
    ) -> None:
        self._producer = producer
        self._redis = redis
        self._ledger = ledger
        self._dead_letter_topic = dead_letter_topic
        self._ttl = redis_ttl_s
        self._prefix = redis_prefix
        self._retry_s = retry_s
        self._on_crash = on_crash
        self._kafka = _Outbox()
        self._redis_box = _Outbox()
        self._tasks: list[asyncio.Task[None]] = []
        self._side_sends: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._kafka_loop(), name="replies-kafka")]
        if self._redis is not None:
            self._tasks.append(asyncio.create_task(self._redis_loop(), name="replies-redis"))
        for task in self._tasks:
            task.add_done_callback(self._supervise)

    def _supervise(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("replies_crashed", task=task.get_name(), error=repr(task.exception()))
            self._on_crash(task.exception())  # type: ignore[arg-type]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._side_sends, return_exceptions=True)

    # -- outcomes -------------------------------------------------------------------------

    def ok(self, ticket: Ticket, response: InferenceResponse) -> None:
        if self._first_outcome(ticket):
            self._deliver(ticket, Status.OK, encode(response, ticket.content_type), None)

    def error(self, ticket: Ticket, rejection: Rejection) -> None:
        """An error result to the reply target, or a dead letter when there is none."""
        if not self._first_outcome(ticket):
            return
        if ticket.reply_to is None:
            self._dead_letter(ticket, rejection)
            return
        if ticket.content_type not in CONTENT_TYPES:  # never let an error fail to encode
            ticket.content_type = JSON
        status = Status.EXPIRED if rejection.code is ErrorCode.EXPIRED else Status.ERROR
        body = ErrorResponse(error=rejection.message, code=rejection.code, id=ticket.request_id)
        self._deliver(ticket, status, encode(body, ticket.content_type), rejection.code)

    def _first_outcome(self, ticket: Ticket) -> bool:
        if ticket.answered:
            log.error("second_outcome_dropped", request_id=ticket.request_id)
            return False
        ticket.answered = True
        return True

    def _deliver(self, ticket: Ticket, status: Status, body: bytes, code: ErrorCode | None) -> None:
        if ticket.reply_to == REPLY_TO_REDIS:
            self._redis_box.put((ticket, body))
            return
        result_headers: list[tuple[str, bytes | None]] = [
            (headers.REQUEST_ID, ticket.request_id.encode()),
            (headers.STATUS, status.encode()),
            (headers.CONTENT_TYPE, ticket.content_type.encode()),
        ]
        if ticket.model:
            result_headers.append((headers.MODEL, ticket.model.encode()))
        if code is not None:
            result_headers.append((headers.ERROR_CODE, code.encode()))
        assert ticket.reply_to is not None
        self._kafka.put(_Write(ticket, ticket.reply_to, body, result_headers, dead_letter=False))

    def _dead_letter(self, ticket: Ticket, rejection: Rejection) -> None:
        """The original bytes and headers, plus why and where they came from."""
        metrics.DEAD_LETTERS.labels(rejection.code).inc()
        log.info(
            "dead_letter",
            request_id=ticket.request_id,
            code=rejection.code,
            reason=rejection.message,
            topic=ticket.tp.topic,
            partition=ticket.tp.partition,
            offset=ticket.offset,
        )
        letter_headers = [(k, v) for k, v in ticket.headers if k not in _DEAD_LETTER_HEADERS]
        letter_headers += [
            (headers.ERROR_CODE, rejection.code.encode()),
            (headers.ERROR_MESSAGE, rejection.message.encode()[:1024]),
            (headers.SOURCE_TOPIC, ticket.tp.topic.encode()),
            (headers.SOURCE_PARTITION, str(ticket.tp.partition).encode()),
            (headers.SOURCE_OFFSET, str(ticket.offset).encode()),
        ]
        self._kafka.put(
            _Write(ticket, self._dead_letter_topic, ticket.value, letter_headers, dead_letter=True)
        )

    # -- Kafka ----------------------------------------------------------------------------

    async def _kafka_loop(self) -> None:
        """Drain the outbox into one record batch per (topic, partition): per-message
        `send()` costs several times more than the model does for a small request."""
        cluster = self._producer.client.cluster
        partitioner = self._producer._partitioner
        while True:
            writes: list[_Write] = await self._kafka.take()
            partitions_of: dict[str, list[int] | None] = {}
            groups: dict[tuple[str, int], list[_Write]] = {}
            for write in writes:
                if write.topic not in partitions_of:
                    known = cluster.partitions_for_topic(write.topic)
                    partitions_of[write.topic] = sorted(known) if known else None
                partitions = partitions_of[write.topic]
                if partitions is None:
                    # Waiting for an unknown topic's metadata can take request_timeout_ms: do
                    # it aside, so one bad reply topic never holds up everyone else's results.
                    self._aside(self._send(write))
                    continue
                partition = partitioner(write.key, partitions, partitions)
                groups.setdefault((write.topic, partition), []).append(write)
            # Partitions go out concurrently: one whose leader is moving must not stall the rest.
            await asyncio.gather(
                *(self._send_batches(*key, group) for key, group in groups.items())
            )

    def _aside(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._side_sends.add(task)
        task.add_done_callback(self._side_sends.discard)

    async def _send_batches(self, topic: str, partition: int, writes: list[_Write]) -> None:
        now_ms = int(time.time() * 1000)
        batch, members = self._producer.create_batch(), []
        for write in writes:
            if batch.append(
                key=write.key, value=write.value, timestamp=now_ms, headers=write.headers
            ):
                members.append(write)
                continue
            if members:  # full: ship it and start the next
                await self._send_batch(batch, topic, partition, members)
                batch, members = self._producer.create_batch(), []
                if batch.append(
                    key=write.key, value=write.value, timestamp=now_ms, headers=write.headers
                ):
                    members.append(write)
                    continue
            await self._send(write)  # larger than a batch on its own: the broker decides
        if members:
            await self._send_batch(batch, topic, partition, members)

    async def _send_batch(
        self, batch: Any, topic: str, partition: int, writes: list[_Write]
    ) -> None:
        try:
            delivery = await self._producer.send_batch(batch, topic, partition=partition)
        except KafkaError as exc:
            for write in writes:
                self._failed(write, exc)
            return
        delivery.add_done_callback(lambda done: self._delivered(writes, done))

    async def _send(self, write: _Write) -> None:
        try:
            delivery = await self._producer.send(
                write.topic, write.value, key=write.key, headers=write.headers
            )
        except KafkaError as exc:
            self._failed(write, exc)
            return
        delivery.add_done_callback(lambda done: self._delivered([write], done))

    def _delivered(self, writes: list[_Write], delivery: asyncio.Future[Any]) -> None:
        exc = None if delivery.cancelled() else delivery.exception()
        if delivery.cancelled() or exc is not None:
            for write in writes:
                self._failed(write, exc or KafkaTimeoutError("delivery cancelled"))
            return
        settle = self._ledger.settle
        for write in writes:
            settle(write.ticket)

    def _failed(self, write: _Write, exc: BaseException) -> None:
        now = time.monotonic()
        if write.first_failure is None:
            write.first_failure = now
        transient = isinstance(exc, KafkaTimeoutError) or (
            isinstance(exc, KafkaError) and exc.retriable
        )
        if not write.dead_letter and (not transient or now - write.first_failure > self._retry_s):
            # The reply target refuses this result (too large, not authorised, no such topic).
            reason = f"result could not be written to {write.topic!r}: {exc!r}"
            self._dead_letter(write.ticket, Rejection(ErrorCode.REPLY_FAILED, reason))
            return
        if write.dead_letter and now - write.first_failure > self._retry_s * _GIVE_UP_FACTOR:
            # The dead-letter topic itself has refused this for minutes: a restart (and a
            # redelivery of the request) beats a worker that only retries.
            self._on_crash(exc)
        if write.dead_letter and isinstance(exc, MessageSizeTooLargeError):
            # Original bytes plus our headers overflow the limit: keep the evidence, not the body.
            write.headers.append(
                (
                    headers.ERROR_MESSAGE,
                    f"original value of {len(write.value)} bytes dropped: "
                    "too large for the dead-letter topic".encode(),
                )
            )
            write.value = b""
        metrics.REPLY_RETRIES.labels("kafka").inc()
        log.warning(
            "kafka_write_retry",
            topic=write.topic,
            error=repr(exc),
            dead_letter=write.dead_letter,
            retry_in=write.retry_in,
        )
        asyncio.get_running_loop().call_later(write.retry_in, self._kafka.put, write)
        write.retry_in = min(write.retry_in * 2, _RETRY_MAX_S)

    # -- Redis ----------------------------------------------------------------------------

    async def _redis_loop(self) -> None:
        while True:
            items: list[tuple[Ticket, bytes]] = await self._redis_box.take(_REDIS_PIPELINE)
            await self._write_redis(items)
            for ticket, _ in items:
                self._ledger.settle(ticket)

    async def _write_redis(self, items: list[tuple[Ticket, bytes]]) -> None:
        """SET NX (the first result of an id wins, so redeliveries stay invisible) then
        PUBLISH, so a waiting client wakes at once. Retried until Redis takes it."""
        assert self._redis is not None
        delay = _RETRY_FIRST_S
        while True:
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for ticket, body in items:
                        key = self._prefix + ticket.request_id
                        pipe.set(key, body, ex=self._ttl, nx=True)
                        pipe.publish(key, body)
                    await pipe.execute()
                return
            except (RedisError, OSError) as exc:
                metrics.REPLY_RETRIES.labels("redis").inc(len(items))
                log.warning(
                    "redis_write_retry", error=repr(exc), results=len(items), retry_in=delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
