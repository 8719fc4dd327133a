"""The last stage: encode outcomes, write them to Kafka, Redis or the dead-letter topic, and
settle each record in the ledger only once its write is durable.

Every ticket gets exactly one outcome here. Kafka writes go to a sink chosen once: this
module's own outbox (at-least-once: record batches, settled on acknowledgement) or the
partition transactions (exactly-once: settled when their transaction commits). Redis results
are written idempotently by request id in both modes.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaTimeoutError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from surge.schemas import ErrorCode, ErrorResponse, InferenceResponse, Status, encode, headers
from surge.schemas.headers import REPLY_TO_REDIS
from surge.workers import metrics
from surge.workers.ledger import Ledger
from surge.workers.tickets import Rejection, Ticket
from surge.workers.writes import (
    RETRY_FIRST_S,
    RETRY_MAX_S,
    RetryPolicy,
    Sent,
    Write,
    by_partition,
    dead_letter,
    send_batches,
    send_one,
)

log = structlog.get_logger("surge.replies")

_REDIS_PIPELINE = 512
# The first result of an id wins and only it is announced: a redelivered request never
# produces a second visible result (nor a second notification).
_SET_AND_PUBLISH = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
    redis.call('PUBLISH', KEYS[1], ARGV[1])
end
return 0
"""


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
        producer: AIOKafkaProducer | None,  # None: every Kafka write goes to the sink
        redis: Redis | None,
        ledger: Ledger,
        *,
        retry: RetryPolicy,
        dead_letter_topic: str,
        redis_ttl_s: int,
        redis_prefix: str,
        on_crash: Callable[[BaseException], None],
        transactional_sink: Callable[[Write], None] | None = None,
    ) -> None:
        self._producer = producer
        self._redis = redis
        self._ledger = ledger
        self._retry = retry
        self._dead_letter_topic = dead_letter_topic
        self._ttl = redis_ttl_s
        self._prefix = redis_prefix
        self._on_crash = on_crash
        self._kafka = _Outbox()
        self._put: Callable[[Write], None] = transactional_sink or self._kafka.put
        assert (producer is None) == (transactional_sink is not None)
        self._redis_box = _Outbox()
        self._set_and_publish = redis.register_script(_SET_AND_PUBLISH) if redis else None
        # Result headers but the request id, by (status, content type, model, error code).
        self._common_headers: dict[tuple[Any, ...], list[tuple[str, bytes | None]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._side_sends: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        if self._producer is not None:
            self._tasks.append(asyncio.create_task(self._kafka_loop(), name="replies-kafka"))
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
            self._put(dead_letter(ticket, rejection, self._dead_letter_topic))
            return
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
        common = self._common_headers.get((status, ticket.content_type, ticket.model, code))
        if common is None:
            common = self._common_headers[status, ticket.content_type, ticket.model, code] = [
                (headers.STATUS, status.encode()),
                (headers.CONTENT_TYPE, ticket.content_type.encode()),
                *([(headers.MODEL, ticket.model.encode())] if ticket.model else []),
                *([(headers.ERROR_CODE, code.encode())] if code is not None else []),
            ]
        result_headers = [(headers.REQUEST_ID, ticket.request_id.encode()), *common]
        assert ticket.reply_to is not None
        self._put(Write(ticket, ticket.reply_to, body, result_headers, dead_letter=False))

    # -- Kafka, at-least-once -------------------------------------------------------------

    async def _kafka_loop(self) -> None:
        assert self._producer is not None
        while True:
            writes: list[Write] = await self._kafka.take()
            groups, unknown = by_partition(self._producer, writes)
            for write in unknown:
                # Waiting for an unknown topic's metadata can take request_timeout_ms: do it
                # aside, so one bad reply topic never holds up everyone else's results.
                self._aside(self._send_one(write))
            # Partitions go out concurrently: one whose leader is moving must not stall the rest.
            await asyncio.gather(*(self._send(*key, group) for key, group in groups.items()))

    def _aside(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._side_sends.add(task)
        task.add_done_callback(self._side_sends.discard)

    async def _send(self, topic: str, partition: int, writes: list[Write]) -> None:
        assert self._producer is not None
        for sent in await send_batches(self._producer, topic, partition, writes):
            self._watch(sent)

    async def _send_one(self, write: Write) -> None:
        assert self._producer is not None
        self._watch(await send_one(self._producer, write))

    def _watch(self, sent: Sent) -> None:
        writes, delivery = sent
        if isinstance(delivery, BaseException):
            for write in writes:
                self._failed(write, delivery)
            return
        delivery.add_done_callback(lambda done: self._delivered(writes, done))

    def _delivered(self, writes: list[Write], delivery: asyncio.Future[Any]) -> None:
        exc = None if delivery.cancelled() else delivery.exception()
        if delivery.cancelled() or exc is not None:
            for write in writes:
                self._failed(write, exc or KafkaTimeoutError("delivery cancelled"))
            return
        settle = self._ledger.settle
        for write in writes:
            settle(write.ticket)

    def _failed(self, write: Write, exc: BaseException) -> None:
        retry = self._retry.after(write, exc)
        if retry is not write:  # a dead letter instead: no reason to wait
            self._kafka.put(retry)
            return
        asyncio.get_running_loop().call_later(write.retry_in, self._kafka.put, write)
        write.retry_in = min(write.retry_in * 2, RETRY_MAX_S)

    # -- Redis ----------------------------------------------------------------------------

    async def _redis_loop(self) -> None:
        while True:
            items: list[tuple[Ticket, bytes]] = await self._redis_box.take(_REDIS_PIPELINE)
            await self._write_redis(items)
            for ticket, _ in items:
                self._ledger.settle(ticket)

    async def _write_redis(self, items: list[tuple[Ticket, bytes]]) -> None:
        """SET NX, then PUBLISH if that set it, so a waiting client wakes at once. Retried
        until Redis takes it."""
        assert self._redis is not None
        assert self._set_and_publish is not None
        delay = RETRY_FIRST_S
        while True:
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for ticket, body in items:
                        key = self._prefix + ticket.request_id
                        await self._set_and_publish(keys=[key], args=[body, self._ttl], client=pipe)
                    await pipe.execute()
                return
            except (RedisError, OSError) as exc:
                metrics.REPLY_RETRIES.labels("redis").inc(len(items))
                log.warning(
                    "redis_write_retry", error=repr(exc), results=len(items), retry_in=delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
