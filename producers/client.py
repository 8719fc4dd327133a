"""The async client: publish requests to Kafka and await their results."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any, Literal, TypeVar

import numpy as np
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, ProducerClosed, TopicAlreadyExistsError
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from surge.config import redis_url_for_bytes
from surge.producers.requests import (
    Prediction,
    PredictionError,
    read_redis_result,
    read_result,
    request_body,
    request_headers,
)
from surge.schemas import MSGPACK, DecodeError, ErrorCode, headers

Result = Prediction | PredictionError
T = TypeVar("T")
log = structlog.get_logger("surge.client")

MAX_REQUEST_SIZE = 1_048_576  # aiokafka's default `max_request_size`, in bytes
# Options aiokafka's producer takes and its consumer and admin client refuse.
PRODUCER_ONLY = frozenset({"max_request_size", "compression_type", "linger_ms", "max_batch_size"})


def split_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Kafka client options as (for every client, for the producer alone)."""
    common = {k: v for k, v in options.items() if k not in PRODUCER_ONLY}
    return common, {k: v for k, v in options.items() if k in PRODUCER_ONLY}


# Redis clean-up after a caller's deadline (MGET of missed results, UNSUBSCRIBE) gets this long
# of its own: a slow Redis must not hold the caller much past its timeout.
_REDIS_TIDY_S = 0.25
_MGET_KEYS = 64  # results read back at once: they may be large
_RESUBSCRIBE_S = 0.2  # between tries to subscribe again while Redis is away
# The subscription connection is pinged this often when quiet, and taken for lost after
# `_REDIS_SILENT_S` without a word (no pong): a half-open connection (a NAT or a firewall
# that dropped it without a reset) would otherwise keep every caller waiting for good.
_REDIS_PING_S = 2.0
_REDIS_SILENT_S = 3 * _REDIS_PING_S
_REDIS_CLOSE_S = 1.0  # closing a connection that is gone must not hold a rebuild up


class ClientClosed(RuntimeError):
    """The client was closed while a request still waited for its result."""


class NotSent(TimeoutError):
    """A call's timeout came before all its requests were handed to Kafka."""


class SurgeClient:
    """Submit requests and await results through a reply topic this client owns, or Redis.

    Results are matched by request id and deduplicated: a redelivered result is dropped.
    """

    def __init__(
        self,
        bootstrap_servers: str = "127.0.0.1:9092",
        *,
        content_type: str = MSGPACK,
        topic_prefix: str = "surge.requests.",
        reply_topic: str | None = None,
        reply_topic_replication: int = 1,
        redis_url: str | None = None,
        redis_prefix: str = "surge:result:",
        kafka_options: Mapping[str, Any] | None = None,
        redis_options: Mapping[str, Any] | None = None,
    ) -> None:
        # Those only a producer takes go to the producer alone.
        common, self._producer_options = split_options(kafka_options or {})
        self._kafka = {"bootstrap_servers": bootstrap_servers, **common}
        # The largest record this client's producer sends, as its options set it.
        self.max_request_size: int = self._producer_options.get(
            "max_request_size", MAX_REQUEST_SIZE
        )
        self.content_type = content_type
        self._topic_prefix = topic_prefix
        self.reply_topic = reply_topic or f"surge.replies.{uuid.uuid4().hex[:16]}"
        # A topic named for this client alone goes when it closes; a named one stays.
        self._delete_reply_topic = reply_topic is None
        self._created_reply_topic = False
        self._reply_replication = reply_topic_replication
        self._redis_url = redis_url
        self._redis_options = dict(redis_options or {})
        self._redis_prefix = redis_prefix
        self._producer: AIOKafkaProducer | None = None
        self._renewal: asyncio.Task[None] | None = None  # of the producer: `_renew_producer`
        # Replaced producers being stopped, and Redis clients being closed.
        self._retiring: set[asyncio.Future[None]] = set()
        self._replies: AIOKafkaConsumer | None = None
        self._replies_reader: asyncio.Task[None] | None = None
        # By reply partition, the offset after the last result read: where a reader started
        # again after one that ended (an error reading the topic) goes on from.
        self._read_to: dict[int, int] = {}
        self._reader_error: BaseException | None = None  # why the last reader ended
        self._orphans: set[str] = set()  # the calls waiting as it ended
        self._resumed: dict[int, int] | None = None  # where the last reader started again
        self._redis: Redis | None = None
        self._pubsub: Any = None
        self._redis_reader: asyncio.Task[None] | None = None
        self._waiting: dict[str, asyncio.Future[Result]] = {}
        self._subscribed: dict[str, asyncio.Event] = {}
        self._readers: list[asyncio.Task[None]] = []
        # Steps of calls under way (setting up, subscribing, sending): close() cancels them.
        self._steps: set[asyncio.Future[Any]] = set()
        # One per reply channel: connecting to a Redis that does not answer must not hold up
        # calls answered through Kafka, nor the other way round.
        self._locks = {"kafka": asyncio.Lock(), "redis": asyncio.Lock()}
        self._closed = False

    async def __aenter__(self) -> SurgeClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        try:
            self._producer = await self._new_producer()
        except BaseException:  # `async with` does not close what a failed enter opened
            await self.close()
            raise

    async def _new_producer(self) -> AIOKafkaProducer:
        options = {"linger_ms": 1, **self._producer_options}
        producer = AIOKafkaProducer(**self._kafka, **options, acks="all", enable_idempotence=True)
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        return producer

    def _delivery_failed(self, exc: BaseException) -> None:
        """aiokafka's idempotent producer keeps the sequence numbers of a batch the broker
        refused for good (a request over the topic's size limit, say), so every later request
        to that partition would fail as out of order: a new producer takes over."""
        refused = isinstance(exc, KafkaError) and not exc.retriable
        if refused and not self._closed and self._renewal is None:
            self._renewal = asyncio.create_task(self._renew_producer())

    async def _renew_producer(self) -> None:
        retired = None
        try:
            fresh = await self._new_producer()
            if self._closed:
                await fresh.stop()
                return
            retired, self._producer = self._producer, fresh
        except KafkaError as exc:  # unreachable now: the next refusal tries again
            log.warning("producer_renewal_failed", error=repr(exc))
        finally:
            self._renewal = None
        if retired is not None:  # what it has in flight finishes first; close() waits for it
            stopping = asyncio.ensure_future(retired.stop())
            self._retiring.add(stopping)
            stopping.add_done_callback(self._retiring.discard)
            await stopping

    async def close(self) -> None:
        """Release everything; a failure closing one resource does not leak the others.
        Calls under way raise ClientClosed at once. Closing again does nothing."""
        if self._closed:
            return
        self._closed = True
        for future in [*self._waiting.values(), *self._steps]:
            future.cancel()  # only close() cancels these: their callers raise ClientClosed
        # A reply channel being set up is closed with the rest.
        async with self._locks["kafka"], self._locks["redis"]:
            for task in self._readers:
                task.cancel()
            await asyncio.gather(*self._readers, return_exceptions=True)
        steps = []
        if self._replies is not None:
            steps.append(self._replies.stop())
        if self._created_reply_topic and self._delete_reply_topic:
            steps.append(self._remove_reply_topic())
        if self._redis is not None:
            steps.append(self._stop_redis())  # bounded: a Redis gone silent holds no close up
        if self._renewal is not None:
            await asyncio.gather(self._renewal, return_exceptions=True)
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        if self._producer is not None:
            steps.append(self._producer.stop())
        for step in steps:
            try:
                await step
            except Exception as exc:
                log.warning("client_close_step_failed", error=repr(exc))

    async def _remove_reply_topic(self) -> None:
        admin = AIOKafkaAdminClient(**self._kafka)
        try:
            await admin.start()
            await admin.delete_topics([self.reply_topic])
        except KafkaError as exc:
            log.warning("reply_topic_not_deleted", topic=self.reply_topic, error=repr(exc))
        finally:
            await admin.close()

    # -- sending ----------------------------------------------------------------------------

    async def submit(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        version: str | int | None = None,
        request_id: str | None = None,
        reply_to: str | None = None,
        deadline_ms: int | None = None,
        topic: str | None = None,
    ) -> str:
        """Publish one request without waiting for its result; returns its id. Cut short by
        close() (ClientClosed), a request already handed to the producer may still go out."""
        request_id = request_id or uuid.uuid4().hex
        body = request_body(inputs, request_id, self.content_type)

        async def publish() -> str:
            delivery = await self._send(
                model, body, version, request_id, reply_to, deadline_ms, topic
            )
            try:
                await delivery
            except KafkaError as exc:
                self._delivery_failed(exc)
                raise
            return request_id

        return await self._closable(publish())

    async def _send(
        self,
        model: str,
        body: bytes,
        version: str | int | None,
        request_id: str,
        reply_to: str | None,
        deadline_ms: int | None,
        topic: str | None,
    ) -> asyncio.Future[Any]:
        assert self._producer is not None, "call start() first"
        if self._closed:
            raise ClientClosed("the client is closed")
        if (renewal := self._renewal) is not None:  # the producer breaks no more requests
            await asyncio.shield(renewal)
        record = {
            "topic": topic or self._topic_prefix + model,
            "value": body,
            "key": request_id.encode(),
            "headers": request_headers(
                model=model,
                content_type=self.content_type,
                reply_to=reply_to,
                version=None if version is None else str(version),
                deadline_ms=deadline_ms,
            ),
        }
        producer = self._producer
        try:
            return await producer.send(**record)
        except ProducerClosed:
            # Replaced while this send waited (for metadata, or for room in a full batch):
            # the record never joined a batch of the old one, so the new one sends it.
            if self._closed or producer is self._producer or self._producer is None:
                raise
            return await self._producer.send(**record)

    # -- awaiting results -------------------------------------------------------------------

    async def predict(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        version: str | int | None = None,
        timeout: float = 30.0,
        via: Literal["kafka", "redis"] = "kafka",
        topic: str | None = None,
    ) -> Prediction:
        """Send one request and return its prediction; raises PredictionError, TimeoutError or
        ClientClosed."""
        (result,) = await self.predict_many(
            model, [inputs], version=version, timeout=timeout, via=via, topic=topic
        )
        assert isinstance(result, Prediction)
        return result

    async def predict_many(
        self,
        model: str,
        batch: Iterable[Mapping[str, np.ndarray]],
        *,
        version: str | int | None = None,
        timeout: float = 30.0,
        via: Literal["kafka", "redis"] = "kafka",
        topic: str | None = None,
        return_exceptions: bool = False,
    ) -> list[Result]:
        """Send many requests and await all results, in order, all within `timeout`; raises
        TensorError, before sending any, if one holds inputs no worker would take. With
        `return_exceptions`, a failed, timed-out or abandoned request yields its
        PredictionError, TimeoutError or ClientClosed in place instead of raising, and one
        that Kafka refused (a MessageSizeTooLargeError, say) its KafkaError: the others'
        results are kept."""
        batch = list(batch)
        if not batch:
            return []
        if self._closed:
            raise ClientClosed("the client is closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        deadline_ms = int((time.time() + timeout) * 1000)  # nobody waits longer: don't compute it
        ids = [uuid.uuid4().hex for _ in batch]
        # All encoded before any is sent: inputs no worker would take raise TensorError here,
        # before a worker computes the rest of the batch for a caller no longer waiting.
        bodies = [
            request_body(inputs, i, self.content_type) for i, inputs in zip(ids, batch, strict=True)
        ]
        futures = [self._waiting.setdefault(i, loop.create_future()) for i in ids]
        pubsub = None  # the Redis subscription this call made, to undo
        subscribing = False  # ... however far it got
        refused: dict[int, KafkaError] = {}  # by position: requests Kafka did not take
        handed: set[int] = set()  # by position: requests the producer took
        step = "waiting for the reply topic" if via == "kafka" else "connecting to Redis"
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    reply_to = await self._closable(self._reply_channel(via))
                    if via == "redis":
                        subscribing, step = True, "subscribing in Redis"
                        pubsub = await self._closable(self._subscribe_now(ids))
                    step = "sending"
                    send = functools.partial(
                        self._send,
                        model,
                        version=version,
                        reply_to=reply_to,
                        deadline_ms=deadline_ms,
                        topic=topic,
                    )
                    await self._closable(self._send_all(send, bodies, ids, refused, handed))
            except TimeoutError as exc:
                if not return_exceptions and len(handed) < len(ids):
                    raise NotSent(
                        f"timed out after {timeout:g}s {step}: {len(handed)} of {len(ids)} "
                        "requests sent"
                    ) from exc
                if not return_exceptions:  # all sent, not all acknowledged yet
                    raise TimeoutError(f"no result within {timeout:g}s") from exc
                # Each request without a result times out in its place, saying whether it
                # was sent at all; those Kafka refused meanwhile keep their refusals.
            except ClientClosed:
                if not return_exceptions:
                    raise
            else:
                if refused and not return_exceptions:
                    raise refused[min(refused)]
                # Only those sent can be answered: the others' results are their refusals.
                sent_ids = [i for n, i in enumerate(ids) if n not in refused]
                sent = [f for n, f in enumerate(futures) if n not in refused]
                if pubsub is not None:
                    pubsub = await self._await_redis(sent_ids, sent, deadline, pubsub)
                elif sent:
                    await self._await_kafka(sent, deadline)
                late = not all(f.done() for f in sent)
                if late and pubsub is not None:
                    await self._tidy(self._fetch_missed(sent_ids, sent))
        except Exception as exc:
            if self._closed and not isinstance(exc, ClientClosed):
                raise ClientClosed("the client was closed during the request") from exc
            raise
        finally:
            for request_id in ids:
                self._waiting.pop(request_id, None)
            if subscribing:  # cut short while subscribing, too: on the connection in hand
                await self._tidy(self._unsubscribe(ids, pubsub or self._pubsub))
        why = ""
        if via == "kafka" and self._reader_error is not None:
            why = f" (reading {self.reply_topic} failed: {self._reader_error!r})"
        results = [
            refused[n]
            if n in refused
            else _outcome(i, f, timeout, why if n in handed else f" (not sent: timed out {step})")
            for n, (i, f) in enumerate(zip(ids, futures, strict=True))
        ]
        if not return_exceptions:
            for result in results:
                if isinstance(result, Exception):
                    raise result
        return results  # type: ignore[return-value]

    async def _await_kafka(self, futures: list[asyncio.Future[Result]], deadline: float) -> None:
        """Wait for results read from the reply topic, until the deadline. A reader that ended
        meanwhile (an error reading the topic) is started again where it stopped, so that
        the results written in between are read too: the callers would otherwise learn of it
        only at their deadline."""
        loop = asyncio.get_running_loop()
        while True:
            waiting = [f for f in futures if not f.done()]
            remaining = deadline - loop.time()
            if not waiting or remaining <= 0:
                return
            reader = self._replies_reader
            if reader is not None and not reader.done():
                await _answered_or_ended(waiting, reader, remaining)
                continue
            # Not at once: an error that ends every reader (no right to read the topic) would
            # otherwise start one after another as fast as they end.
            await asyncio.sleep(min(_RESUBSCRIBE_S, remaining))
            try:
                async with asyncio.timeout_at(deadline):
                    await self._closable(self._reply_channel("kafka"))
            except (TimeoutError, ClientClosed):
                return  # the deadline, or close(): each caller's outcome says which
            except (KafkaError, RuntimeError) as exc:  # the cluster away: try again shortly
                log.debug("reply_reader_restart_failed", error=repr(exc))

    async def _await_redis(
        self, ids: list[str], futures: list[asyncio.Future[Result]], deadline: float, pubsub: Any
    ) -> Any:
        """Wait for results announced on Redis, until the deadline. A pub/sub connection lost
        meanwhile is rebuilt at once, the ids still waiting subscribed again and what was
        published in between read from its keys: the callers would otherwise learn of it only
        at their deadline. Returns the pub/sub holding the subscriptions now."""
        loop = asyncio.get_running_loop()
        missed = False  # subscribed again: what was announced before is read from the keys
        while True:
            waiting = [(i, f) for i, f in zip(ids, futures, strict=True) if not f.done()]
            remaining = deadline - loop.time()
            if not waiting or remaining <= 0:
                return pubsub
            reader = self._redis_reader
            alive = reader is not None and not reader.done() and pubsub is self._pubsub
            if alive and not missed:
                await _answered_or_ended([f for _, f in waiting], reader, remaining)
                continue
            try:
                async with asyncio.timeout_at(deadline):
                    if not alive:  # the connection went with the reader: a new one
                        await self._closable(self._reply_channel("redis"))
                        pubsub = self._pubsub
                        await self._closable(self._subscribe([i for i, _ in waiting], pubsub))
                        missed = True
                    await self._fetch_missed([i for i, _ in waiting], [f for _, f in waiting])
                    missed = False
            except (TimeoutError, ClientClosed):
                return pubsub  # the deadline, or close(): each caller's outcome says which
            except (RedisError, OSError) as exc:  # Redis still away: try again shortly
                log.debug("redis_resubscribe_failed", error=repr(exc))
                await asyncio.sleep(min(_RESUBSCRIBE_S, max(0.0, deadline - loop.time())))

    async def _closable(self, step: Coroutine[Any, Any, T]) -> T:
        """Run a step of a call as a task that close() can cancel: a caller waiting for a
        topic's metadata or a Redis confirmation learns at once that the client closed."""
        task = asyncio.ensure_future(step)
        self._steps.add(task)
        try:
            return await task  # the caller's own timeout or cancellation cancels the step too
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self._closed and not (current is not None and current.cancelling()):
                raise ClientClosed("the client was closed during the request") from None
            raise
        finally:
            self._steps.discard(task)

    async def _send_all(
        self,
        send: Callable[..., Awaitable[asyncio.Future[Any]]],
        bodies: list[bytes],
        ids: list[str],
        refused: dict[int, KafkaError],
        handed: set[int],
    ) -> None:
        """Send every request: into `handed` go the positions of those the producer took,
        into `refused` those Kafka refused, as they happen (a call cut short keeps both). A
        refusal (a record over the topic's max.message.bytes, say) fails those requests, not
        the rest."""
        deliveries: dict[int, asyncio.Future[Any]] = {}
        for n, (request_id, body) in enumerate(zip(ids, bodies, strict=True)):
            try:
                deliveries[n] = await send(body=body, request_id=request_id)
            except KafkaError as exc:  # refused before it went out: over max_request_size
                refused[n] = exc
                continue
            handed.add(n)
        outcomes = await asyncio.gather(*deliveries.values(), return_exceptions=True)
        for n, outcome in zip(deliveries, outcomes, strict=True):
            if isinstance(outcome, KafkaError):
                refused[n] = outcome
                self._delivery_failed(outcome)
            elif isinstance(outcome, BaseException):
                raise outcome

    async def _tidy(self, step: Coroutine[Any, Any, None]) -> None:
        """Run a Redis step after a wait: bounded, and its failure never the caller's outcome."""
        try:
            async with asyncio.timeout(_REDIS_TIDY_S):
                await step
        except (TimeoutError, RedisError, OSError) as exc:
            log.debug("redis_tidy_skipped", error=repr(exc))

    async def _fetch_missed(self, ids: list[str], futures: list[asyncio.Future[Result]]) -> None:
        """Redis may hold results whose notification was missed (e.g. across a reconnect):
        read those still unanswered, a few at a time (results may be large)."""
        redis = self._redis
        if self._closed or redis is None:  # closed, or lost and not rebuilt: nothing to ask
            return
        pending = [(i, f) for i, f in zip(ids, futures, strict=True) if not f.done()]
        for start in range(0, len(pending), _MGET_KEYS):
            chunk = pending[start : start + _MGET_KEYS]
            values = await redis.mget([self._redis_prefix + i for i, _ in chunk])
            for (request_id, future), value in zip(chunk, values, strict=True):
                if value is not None and not future.done():
                    future.set_result(_read_result(value, self.content_type, request_id))

    def _resolve(self, request_id: str, result: Result) -> None:
        future = self._waiting.get(request_id)
        if future is not None and not future.done():  # duplicates and strays are dropped
            future.set_result(result)

    async def _reply_channel(self, via: str) -> str:
        async with self._locks["redis" if via == "redis" else "kafka"]:
            if self._closed:
                raise ClientClosed("the client is closed")
            if via == "redis":
                if self._redis is not None and self._redis_reader_dead():
                    await self._stop_redis()  # its reader died with the connection: rebuild
                if self._redis is None:
                    await self._start_redis()
                return headers.REPLY_TO_REDIS
            if self._replies is not None and self._replies_reader_dead():
                # Its reader died on an error (a corrupt record, no right to read the topic):
                # start another rather than leave every call to time out.
                replies, self._replies = self._replies, None
                with contextlib.suppress(KafkaError):
                    await replies.stop()
            if self._replies is None:
                # After a reader that ended, and after a start of another that failed or was
                # cut short, alike: from where the last reader stopped.
                resume = self._resume_from() if self._replies_reader is not None else {}
                await self._start_reply_topic(resume)
                if resume:
                    self._resumed = resume
            return self.reply_topic

    def _resume_from(self) -> dict[int, int]:
        """Where a reader started after one that ended goes on from (by partition): where
        that one stopped, if a call waiting then still waits, for its result may have come
        meanwhile; else from the end, as a named reply topic may have taken hours of others'
        results since. From the end too if a reader resumed at the same place before: a
        record no reader gets past is skipped, rather than stop every reader after it."""
        if not self._orphans & self._waiting.keys():
            return {}
        if self._read_to == self._resumed:
            log.warning("reply_reader_skips_to_end", topic=self.reply_topic, at=self._read_to)
            return {}
        return dict(self._read_to)

    async def _start_reply_topic(self, resume: dict[int, int]) -> None:
        """Read the reply topic from its end, or from `resume` (offsets by partition)."""
        admin = AIOKafkaAdminClient(**self._kafka)
        try:
            await admin.start()
            if self.reply_topic not in await admin.list_topics():
                # Ours from the request on: a call cut off while the broker creates it still
                # leaves it to delete at close.
                self._created_reply_topic = True
                topic = NewTopic(self.reply_topic, 1, self._reply_replication)
                response = await admin.create_topics([topic])
                for name, code, message in response.topic_errors:
                    if code not in (0, TopicAlreadyExistsError.errno):
                        raise RuntimeError(f"cannot create reply topic {name}: {code} {message}")
        finally:
            await admin.close()
        consumer = AIOKafkaConsumer(
            **self._kafka, isolation_level="read_committed", enable_auto_commit=False
        )
        try:
            await consumer.start()
            delay = 0.01
            while not (partitions := consumer.partitions_for_topic(self.reply_topic)):
                await asyncio.sleep(delay)  # a new topic's metadata shows up within moments
                delay = min(delay * 2, 1.0)
                await consumer._client.force_metadata_update()
            assigned = [TopicPartition(self.reply_topic, p) for p in partitions]
            consumer.assign(assigned)
            if fresh := [tp for tp in assigned if tp.partition not in resume]:
                await consumer.seek_to_end(*fresh)
            for tp in assigned:
                if tp.partition in resume:
                    consumer.seek(tp, resume[tp.partition])
                # Pinned before the first request goes out.
                self._read_to[tp.partition] = await consumer.position(tp)
        except BaseException:
            await consumer.stop()
            raise
        self._replies, self._reader_error = consumer, None
        self._replies_reader = asyncio.create_task(self._read_reply_topic(consumer))
        self._readers = [task for task in self._readers if not task.done()]
        self._readers.append(self._replies_reader)

    def _replies_reader_dead(self) -> bool:
        return self._replies_reader is not None and self._replies_reader.done()

    async def _read_reply_topic(self, consumer: AIOKafkaConsumer) -> None:
        try:
            async for record in consumer:
                self._on_reply(record)
                self._read_to[record.partition] = record.offset + 1
        except Exception as exc:  # the callers waiting start a new reader, where this stopped
            self._reader_error = exc
            log.warning("reply_reader_lost", topic=self.reply_topic, error=repr(exc))
        finally:
            self._orphans = set(self._waiting)

    def _on_reply(self, record: Any) -> None:
        try:
            fields = {k: v or b"" for k, v in record.headers}
            request_id = fields.get(headers.REQUEST_ID, b"").decode(errors="replace")
            if request_id in self._waiting:
                status = fields.get(headers.STATUS, b"error").decode(errors="replace")
                content_type = (
                    fields.get(headers.CONTENT_TYPE, b"").decode(errors="replace")
                    or self.content_type
                )
                result = _read_result(record.value or b"", content_type, request_id, status)
                self._resolve(request_id, result)
        except Exception:  # one unreadable record must not stop the reader
            log.exception("unreadable_result", topic=record.topic, offset=record.offset)

    async def _start_redis(self) -> None:
        if not self._redis_url:
            raise ValueError("Redis replies need redis_url")
        # Results and channel names are read as bytes, whatever the options say. No retries:
        # redis-py would reconnect the subscription inside the reader, unseen, and what was
        # published meanwhile would wait for the callers' deadlines; a lost connection ends
        # the reader instead, and the callers subscribe again and read what they missed.
        options = {**self._redis_options, "decode_responses": False, "retry": Retry(NoBackoff(), 0)}
        redis = Redis.from_url(redis_url_for_bytes(self._redis_url), **options)
        pubsub = redis.pubsub()
        try:
            # A standing subscription keeps the reader alive between requests.
            await pubsub.subscribe(f"surge:client:{uuid.uuid4().hex}")
        except BaseException:
            await pubsub.aclose()
            await redis.aclose()
            raise
        self._redis, self._pubsub = redis, pubsub
        self._redis_reader = asyncio.create_task(self._read_redis())
        self._readers = [task for task in self._readers if not task.done()]
        self._readers.append(self._redis_reader)

    def _redis_reader_dead(self) -> bool:
        return self._redis_reader is not None and self._redis_reader.done()

    async def _stop_redis(self) -> None:
        redis, pubsub, reader = self._redis, self._pubsub, self._redis_reader
        # Unset first: a caller past its deadline must not reuse what is being closed.
        self._redis = self._pubsub = self._redis_reader = None
        self._subscribed.clear()
        # On its own, shielded: a caller cut off meanwhile (its deadline) must not leave the
        # second connection open, with nothing left that refers to it; close() waits for it.
        closing = asyncio.ensure_future(_close_redis(redis, pubsub, reader))
        self._retiring.add(closing)
        closing.add_done_callback(self._retiring.discard)
        await asyncio.shield(closing)

    async def _subscribe(self, ids: list[str], pubsub: Any) -> None:
        if pubsub is None:  # another caller is rebuilding the connection: as lost
            raise RedisConnectionError("the Redis subscription connection is being rebuilt")
        channels = [self._redis_prefix + i for i in ids]
        events = [self._subscribed.setdefault(c, asyncio.Event()) for c in channels]
        await pubsub.subscribe(*channels)
        # Confirmed: a result published from now on reaches us. Unless the reader ends first,
        # with its connection: then no confirmation ever comes.
        confirmed = asyncio.get_running_loop().create_task(_all_set(events))
        reader = self._redis_reader
        try:
            await asyncio.wait(
                [confirmed, *([reader] if reader else [])], return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            confirmed.cancel()
        if not all(event.is_set() for event in events):
            raise RedisConnectionError("the Redis subscription connection was lost")

    async def _subscribe_now(self, ids: list[str]) -> Any:
        """Subscribe on the connection in hand, rebuilt once if it is found lost meanwhile
        (fallen silent, say). Returns the pub/sub holding the subscriptions."""
        pubsub = self._pubsub
        try:
            await self._subscribe(ids, pubsub)
        except RedisConnectionError:
            await self._reply_channel("redis")
            pubsub = self._pubsub
            await self._subscribe(ids, pubsub)
        return pubsub

    async def _unsubscribe(self, ids: list[str], pubsub: Any | None) -> None:
        channels = [self._redis_prefix + i for i in ids]
        for channel in channels:
            self._subscribed.pop(channel, None)
        # A closed or replaced connection took these subscriptions with it; calling it would
        # only open a new one.
        if not self._closed and pubsub is not None and pubsub is self._pubsub:
            await pubsub.unsubscribe(*channels)

    async def _read_redis(self) -> None:
        """Until the connection is lost or falls silent: then the next Redis call rebuilds
        the client. A quiet connection is pinged, and must answer."""
        pubsub, loop = self._pubsub, asyncio.get_running_loop()
        heard = pinged = loop.time()
        try:
            while True:
                message = await pubsub.get_message(timeout=_REDIS_PING_S)
                now = loop.time()
                if message is not None:
                    heard = now
                    self._on_redis_message(message)
                elif now - heard > _REDIS_SILENT_S:
                    log.warning("redis_reader_silent", seconds=round(now - heard, 1))
                    return
                elif now - pinged >= _REDIS_PING_S:
                    await pubsub.ping()
                    pinged = now
        except (RedisError, OSError) as exc:
            log.warning("redis_reader_lost", error=repr(exc))

    def _on_redis_message(self, message: dict[str, Any]) -> None:
        prefix = len(self._redis_prefix)
        try:
            channel = (message.get("channel") or b"").decode()
            if message["type"] == "subscribe":
                event = self._subscribed.get(channel)
                if event is not None:
                    event.set()
            elif message["type"] == "message" and channel[prefix:] in self._waiting:
                request_id = channel[prefix:]
                result = _read_result(message["data"], self.content_type, request_id)
                self._resolve(request_id, result)
        except Exception:  # one unreadable result must not stop the reader
            log.exception("unreadable_result", channel=message.get("channel"))


async def _close_redis(redis: Any, pubsub: Any, reader: asyncio.Task[None] | None) -> None:
    """Stop the subscription's reader (left running, it would connect again), then close
    the subscription and its client, each within `_REDIS_CLOSE_S`: a connection that is gone
    must not hold a rebuild up."""
    if reader is not None:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    for resource in (pubsub, redis):
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(_REDIS_CLOSE_S):
                await resource.aclose()


def _read_result(
    body: bytes, content_type: str, request_id: str, status: str | None = None
) -> Result:
    """A result read from a reply topic (with its `surge-status`) or from Redis (`status`
    None: the body tells). One that cannot be read is its caller's error result: as an
    exception it would leave the caller to time out, or fail the results read with it."""
    try:
        if content_type not in headers.CONTENT_TYPES:
            raise ValueError(f"unknown content type {content_type!r}")
        if status is None:
            return read_redis_result(body, content_type)
        return read_result(body, content_type, status)
    except (DecodeError, ValueError) as exc:  # UnicodeDecodeError and TensorError included
        message = f"the result for {request_id} could not be read as {content_type}: {exc}"
        return PredictionError(ErrorCode.BAD_ENCODING, message, request_id)


def _outcome(
    request_id: str, future: asyncio.Future[Result], timeout: float, why: str = ""
) -> Result | Exception:
    if future.cancelled():
        return ClientClosed(f"the client was closed before the result for {request_id} came")
    if not future.done():
        return TimeoutError(f"no result for {request_id} within {timeout:g}s{why}")
    return future.result()


async def _answered_or_ended(
    futures: list[asyncio.Future[Result]], reader: asyncio.Task[None], timeout: float
) -> None:
    """Until every future is done, or the reader that would set them ends, or `timeout`."""
    answered = asyncio.get_running_loop().create_task(asyncio.wait(futures))  # cancelled below
    try:
        await asyncio.wait([answered, reader], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        answered.cancel()


async def _all_set(events: list[asyncio.Event]) -> None:
    for event in events:
        await event.wait()
