"""The last stage: encode outcomes, write them to Kafka, Redis or the dead-letter topic, and
settle each record in the ledger only once its write is acknowledged."""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from surge.schemas import ErrorCode, ErrorResponse, InferenceResponse, Status, encode, headers
from surge.schemas.headers import REPLY_TO_REDIS
from surge.workers import metrics
from surge.workers.ledger import Ledger
from surge.workers.tickets import Rejection, Ticket

log = structlog.get_logger("surge.replies")

_RETRY_FIRST_S = 0.05
_RETRY_MAX_S = 2.0
_REDIS_PIPELINE = 512


@dataclass(slots=True)
class _Write:
    """One record to produce, and the ticket it settles once acknowledged."""

    ticket: Ticket
    topic: str
    value: bytes
    headers: list[tuple[str, bytes]]
    dead_letter: bool
    key: bytes = b""

    def __post_init__(self) -> None:
        self.key = self.ticket.key or self.ticket.request_id.encode()  # results join by key


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
    ) -> None:
        self._producer = producer
        self._redis = redis
        self._ledger = ledger
        self._dead_letter_topic = dead_letter_topic
        self._ttl = redis_ttl_s
        self._prefix = redis_prefix
        self._kafka_box: deque[_Write] = deque()
        self._redis_box: deque[tuple[Ticket, bytes]] = deque()
        self._kafka_wake = asyncio.Event()
        self._redis_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._pending_sends: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._kafka_loop(), name="replies-kafka")]
        if self._redis is not None:
            self._tasks.append(asyncio.create_task(self._redis_loop(), name="replies-redis"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._pending_sends, return_exceptions=True)

    # -- outcomes -------------------------------------------------------------------------

    def ok(self, ticket: Ticket, response: InferenceResponse) -> None:
        self._deliver(ticket, Status.OK, encode(response, ticket.content_type), None)

    def error(self, ticket: Ticket, rejection: Rejection) -> None:
        """An error result to the reply target, or a dead letter when there is none."""
        if ticket.reply_to is None:
            self._dead_letter(ticket, rejection)
            return
        status = Status.EXPIRED if rejection.code is ErrorCode.EXPIRED else Status.ERROR
        body = ErrorResponse(error=rejection.message, code=rejection.code, id=ticket.request_id)
        self._deliver(ticket, status, encode(body, ticket.content_type), rejection.code)

    def _deliver(self, ticket: Ticket, status: Status, body: bytes, code: ErrorCode | None) -> None:
        if ticket.reply_to == REPLY_TO_REDIS:
            self._redis_box.append((ticket, body))
            self._redis_wake.set()
            return
        result_headers = [
            (headers.REQUEST_ID, ticket.request_id.encode()),
            (headers.STATUS, status.encode()),
            (headers.CONTENT_TYPE, ticket.content_type.encode()),
        ]
        if ticket.model:
            result_headers.append((headers.MODEL, ticket.model.encode()))
        if code is not None:
            result_headers.append((headers.ERROR_CODE, code.encode()))
        assert ticket.reply_to is not None
        self._enqueue(_Write(ticket, ticket.reply_to, body, result_headers, dead_letter=False))

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
        extra = (
            headers.ERROR_CODE,
            headers.ERROR_MESSAGE,
            headers.SOURCE_TOPIC,
            headers.SOURCE_PARTITION,
            headers.SOURCE_OFFSET,
        )
        dl_headers = [(k, v) for k, v in ticket.headers if k not in extra]
        dl_headers += [
            (headers.ERROR_CODE, rejection.code.encode()),
            (headers.ERROR_MESSAGE, rejection.message.encode()[:1024]),
            (headers.SOURCE_TOPIC, ticket.tp.topic.encode()),
            (headers.SOURCE_PARTITION, str(ticket.tp.partition).encode()),
            (headers.SOURCE_OFFSET, str(ticket.offset).encode()),
        ]
        self._enqueue(_Write(ticket, self._dead_letter_topic, ticket.value, dl_headers, True))

    # -- Kafka ----------------------------------------------------------------------------

    def _enqueue(self, write: _Write) -> None:
        self._kafka_box.append(write)
        self._kafka_wake.set()

    async def _kafka_loop(self) -> None:
        """Drain the outbox into one record batch per (topic, partition): per-message
        `send()` costs several times more than the model does for a small request."""
        cluster = self._producer.client.cluster
        partitioner = self._producer._partitioner
        while True:
            if not self._kafka_box:
                self._kafka_wake.clear()
                await self._kafka_wake.wait()
                continue
            writes = list(self._kafka_box)
            self._kafka_box.clear()
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
                    task = asyncio.create_task(self._send(write))
                    self._pending_sends.add(task)
                    task.add_done_callback(self._pending_sends.discard)
                    continue
                partition = partitioner(write.key, partitions, partitions)
                groups.setdefault((write.topic, partition), []).append(write)
            for (topic, partition), group in groups.items():
                await self._send_batches(topic, partition, group)

    async def _send_batches(self, topic: str, partition: int, writes: list[_Write]) -> None:
        batch, members = self._producer.create_batch(), []
        for write in writes:
            if batch.append(
                key=write.key, value=write.value, timestamp=None, headers=write.headers
            ):
                members.append(write)
                continue
            if members:  # full: ship it and start the next
                await self._send_batch(batch, topic, partition, members)
                batch, members = self._producer.create_batch(), []
                if batch.append(
                    key=write.key, value=write.value, timestamp=None, headers=write.headers
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
        delivery.add_done_callback(functools.partial(self._delivered, writes))

    async def _send(self, write: _Write) -> None:
        try:
            delivery = await self._producer.send(
                write.topic, write.value, key=write.key, headers=write.headers
            )
        except KafkaError as exc:
            self._failed(write, exc)
            return
        delivery.add_done_callback(functools.partial(self._delivered, [write]))

    def _delivered(self, writes: list[_Write], delivery: asyncio.Future[Any]) -> None:
        exc = None if delivery.cancelled() else delivery.exception()
        if delivery.cancelled() or exc is not None:
            for write in writes:
                self._failed(write, exc or TimeoutError("delivery cancelled"))
            return
        settle = self._ledger.settle
        for write in writes:
            settle(write.ticket)

    def _failed(self, write: _Write, exc: BaseException) -> None:
        retriable = (isinstance(exc, KafkaError) and exc.retriable) or isinstance(exc, TimeoutError)
        if not retriable and not write.dead_letter:
            # The reply target refuses this result (too large, not authorised, bad topic).
            reason = f"result could not be written to {write.topic!r}: {exc!r}"
            self._dead_letter(write.ticket, Rejection(ErrorCode.REPLY_FAILED, reason))
            return
        metrics.REPLY_RETRIES.labels("kafka").inc()
        log.warning("kafka_write_retry", topic=write.topic, error=repr(exc))
        loop = asyncio.get_running_loop()
        loop.call_later(_RETRY_FIRST_S, self._enqueue, write)

    # -- Redis ----------------------------------------------------------------------------

    async def _redis_loop(self) -> None:
        assert self._redis is not None
        while True:
            if not self._redis_box:
                self._redis_wake.clear()
                await self._redis_wake.wait()
                continue
            take = min(len(self._redis_box), _REDIS_PIPELINE)
            items = [self._redis_box.popleft() for _ in range(take)]
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
