"""A load generator: publish pre-encoded requests at a fixed rate (open loop) or all at once,
and time each result by request id. Used by `surge demo` and the benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner
from redis.asyncio import Redis

from surge.producers.requests import Prediction, read_redis_result, request_body, request_headers
from surge.schemas import MSGPACK, DecodeError, headers

_TICK_S = 0.001  # open-loop send granularity: at most one wake-up per tick
_BURST_CHUNK = 1024  # a burst goes out this many requests at a time
# The id suffix of the one untimed request a run sends first. The first result to a new reply
# topic waits for the worker to look the topic up, and a new producer's first send for its
# producer id: costs of a run's start that a long-lived client pays once, not steady state.
_PRIMING = "priming"
_PRIMING_WAIT_S = 30.0
_METADATA_WAIT_S = 30.0  # for a reply topic to show up in the cluster's metadata


@dataclass
class LoadReport:
    offered_rate: float | None  # requests/s, None for a burst
    sent: int
    elapsed_s: float  # first send to last result
    latencies_ms: np.ndarray  # one per result received
    statuses: Counter[str] = field(default_factory=Counter)
    # Kafka results only: from the result record's timestamp (the worker stamps a record batch
    # as it builds it) to its receipt here: the worker's producer queue and the broker's hop.
    # Meaningful with both on one host, or with synchronised clocks.
    delivery_ms: np.ndarray = field(default_factory=lambda: np.empty(0))

    @property
    def received(self) -> int:
        return len(self.latencies_ms)

    @property
    def throughput(self) -> float:
        return self.received / self.elapsed_s if self.elapsed_s else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.received else float("nan")

    def delivery_percentile(self, q: float) -> float:
        return float(np.percentile(self.delivery_ms, q)) if len(self.delivery_ms) else float("nan")


async def run_load(
    bootstrap_servers: str,
    model: str,
    make_inputs: Callable[[int], Mapping[str, np.ndarray]],
    *,
    count: int,
    rate: float | None = None,
    content_type: str = MSGPACK,
    via: Literal["kafka", "redis"] = "kafka",
    redis_url: str | None = None,
    redis_prefix: str = "surge:result:",
    topic: str | None = None,
    reply_topic: str | None = None,
    timeout_s: float = 120.0,
    linger_ms: float = 0.0,
    pause_gc: bool = True,
    kafka_options: Mapping[str, Any] | None = None,
    on_first_send: Callable[[], None] | None = None,
    on_last_result: Callable[[], None] | None = None,
) -> LoadReport:
    """Send `count` requests (at `rate` per second, or as fast as possible) and collect results.
    Kafka results go to `reply_topic`, an existing topic that outlives the run (see
    `shared_reply_topic()`), or to a topic of the run's own. One request first, untimed,
    primes the path (see `_PRIMING`). At a `rate`, a request goes out `linger_ms` after it
    was due, with every other request due by then, as a Kafka producer's `linger.ms` holds
    it (0: at once, at the next 1 ms tick); its latency counts from when it was due, the wait
    included. (A producer also sends a partition's batch early once it holds `batch.size`,
    16 KiB by default; this waits out the linger whatever it holds.) Python's cyclic garbage
    collector pauses while a run is timed (`pause_gc`). `on_first_send` runs once every
    request is encoded, just before the first timed one goes out; `on_last_result` as the
    last result comes in (if it does)."""
    if linger_ms < 0:
        raise ValueError(f"linger_ms must be 0 or more, not {linger_ms}")
    if rate is not None and not (0 < rate < math.inf):  # NaN too
        raise ValueError(f"rate must be a positive number of requests per second, not {rate}")
    if not count:  # nothing to send, no result to wait for
        return LoadReport(offered_rate=rate, sent=0, elapsed_s=0.0, latencies_ms=np.empty(0))
    kafka = {"bootstrap_servers": bootstrap_servers, **(kafka_options or {})}
    run_id = uuid.uuid4().hex[:12]
    primed = asyncio.Event()
    ids = [f"{run_id}-{i}" for i in range(count)]
    bodies = [request_body(make_inputs(i), ids[i], content_type) for i in range(count)]
    keys = [request_id.encode() for request_id in ids]
    sent_at = np.zeros(count)
    # Lists, not numpy arrays: a numpy scalar read per result costs more than the rest of
    # recording it, in a process that shares the machine with the worker it measures.
    got_at: list[float] = [math.nan] * count
    delivered_in: list[float] = [math.nan] * count
    statuses: Counter[str] = Counter()
    done = asyncio.Event()

    def record(
        request_id: str, status: str, received_at: float, delivered_ms: float | None = None
    ) -> None:
        """A result arrived at `received_at` (`time.perf_counter()`), `delivered_ms` after
        the worker wrote it."""
        run, _, suffix = request_id.rpartition("-")
        if run != run_id:  # an earlier run's result, on a reply topic that outlives runs
            return
        if suffix == _PRIMING:
            primed.set()
            return
        index = int(suffix)
        if math.isnan(got_at[index]):  # the first time: duplicates count once
            got_at[index] = received_at
            if delivered_ms is not None:
                delivered_in[index] = delivered_ms
            statuses[status] += 1
            if statuses.total() == count:
                done.set()
                if on_last_result is not None:
                    on_last_result()

    if via == "redis":
        collector, reply_to = (
            await _redis_collector(redis_url, redis_prefix, run_id, content_type, record),
            headers.REPLY_TO_REDIS,
        )
    else:
        reply_to = reply_topic or _topic_name()
        collector = await _kafka_collector(kafka, reply_to, record, own=reply_topic is None)

    producer = AIOKafkaProducer(
        **kafka, acks="all", enable_idempotence=True, linger_ms=0, max_batch_size=256 * 1024
    )
    try:
        await producer.start()
    except BaseException:
        await collector()
        raise
    request_topic = topic or f"surge.requests.{model}"
    route = request_headers(model=model, content_type=content_type, reply_to=reply_to)
    paused = False
    try:
        partitions = sorted(await producer.partitions_for(request_topic))
        # Where `send()` would put each request: Kafka's default partitioner, by key.
        choose = DefaultPartitioner()
        targets = [choose(key, partitions, partitions) for key in keys]
        priming = f"{run_id}-{_PRIMING}"
        body = request_body(make_inputs(0), priming, content_type)
        await producer.send_and_wait(request_topic, body, key=priming.encode(), headers=route)
        with contextlib.suppress(TimeoutError):  # the timed requests will show what is wrong
            async with asyncio.timeout(min(timeout_s, _PRIMING_WAIT_S)):
                await primed.wait()
        # No cyclic garbage collection while timing, as timeit does: a full collection walks
        # every object the process holds (50-65 ms in a benchmark that has imported torch),
        # and the results that arrive meanwhile would count it as the worker's latency.
        if pause_gc:
            _pause_gc()
            paused = True
        if on_first_send is not None:
            on_first_send()
        linger_s = linger_ms / 1000
        started = time.perf_counter()
        deliveries: list[asyncio.Future[Any]] = []
        sent = 0
        while sent < count:
            if rate is None:
                due = min(count, sent + _BURST_CHUNK)
            else:
                now = time.perf_counter()
                # The oldest request not sent yet leaves once it has lingered: every send
                # costs the generator, the broker and the worker's fetch a wake-up each,
                # whatever it holds.
                send_at = started + sent / rate + linger_s
                if now < send_at:
                    # At low rates, a wake-up every tick would cost this process more CPU
                    # than the requests it sends.
                    await asyncio.sleep(max(_TICK_S, send_at - now))
                    continue
                due = min(count, int((now - started) * rate) + 1)
            # Latency counts from when a request was due (open loop: a generator that falls
            # behind does not hide its delay), or, in a burst, from this round's start.
            if rate is None:
                sent_at[sent:due] = started
            else:
                sent_at[sent:due] = started + np.arange(sent, due) / rate
            # What is due goes out now as record batches, per partition: per-message sends
            # would cost the generator more CPU than the worker spends on a request.
            by_partition: dict[int, list[tuple[bytes, bytes, list[tuple[str, bytes]]]]] = {}
            for i in range(sent, due):
                by_partition.setdefault(targets[i], []).append((keys[i], bodies[i], route))
            for partition, records in by_partition.items():
                deliveries += await send_batches(producer, request_topic, partition, records)
            sent = due
            await asyncio.sleep(0)  # let the collector read
        await asyncio.gather(*deliveries)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await done.wait()
        got, delivered = np.array(got_at), np.array(delivered_in)
        received = ~np.isnan(got)
        last = np.nanmax(got) if received.any() else time.perf_counter()
        return LoadReport(
            offered_rate=rate,
            sent=count,
            elapsed_s=float(last - started),
            latencies_ms=(got[received] - sent_at[received]) * 1000,
            statuses=statuses,
            delivery_ms=delivered[~np.isnan(delivered)],
        )
    finally:
        if paused:
            _resume_gc()
        await producer.stop()
        await collector()


# Runs timing at once in this process (the collector is the process's), and whether the
# collector ran before the first of them paused it.
_gc_pauses = 0
_gc_was_enabled = False


def _pause_gc() -> None:
    global _gc_pauses, _gc_was_enabled
    if _gc_pauses == 0:
        _gc_was_enabled = gc.isenabled()
        gc.disable()
    _gc_pauses += 1


def _resume_gc() -> None:
    """The last of the runs timing at once gives the collector back as it found it."""
    global _gc_pauses
    _gc_pauses -= 1
    if _gc_pauses == 0 and _gc_was_enabled:
        gc.enable()


async def send_batches(
    producer: AIOKafkaProducer,
    topic: str,
    partition: int,
    records: Iterable[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]],
) -> list[asyncio.Future[Any]]:
    """Enqueue (key, value, headers) records to one partition as few record batches as fit;
    their delivery futures."""
    deliveries = []
    batch = producer.create_batch()
    for key, value, fields in records:
        if not batch.append(key=key, value=value, timestamp=None, headers=fields):
            deliveries.append(await producer.send_batch(batch, topic, partition=partition))
            batch = producer.create_batch()
            batch.append(key=key, value=value, timestamp=None, headers=fields)
    deliveries.append(await producer.send_batch(batch, topic, partition=partition))
    return deliveries


@contextlib.contextmanager
def shared_reply_topic(
    bootstrap_servers: str, kafka_options: Mapping[str, Any] | None = None
) -> Iterator[str]:
    """A reply topic for many runs, as a long-lived client keeps one; deleted on exit. A new
    topic costs its first results more: the worker looks it up, and the broker stalls once
    (40-50 ms here) as the partition's log reaches its first index entry (`index.interval.bytes`,
    4 KiB by default). Runs that each made their own topic measured that every time. For
    callers outside an event loop (each run then has a loop of its own)."""
    kafka = {"bootstrap_servers": bootstrap_servers, **(kafka_options or {})}
    name = _topic_name()
    asyncio.run(_create_topic(kafka, name))
    try:
        yield name
    finally:
        # A broker gone by now must not hide what went wrong inside the block.
        with contextlib.suppress(KafkaError, OSError):
            asyncio.run(_delete_topic(kafka, name))


def _topic_name() -> str:
    return f"surge.load.{uuid.uuid4().hex[:12]}"


async def _create_topic(kafka: Mapping[str, Any], topic: str) -> None:
    admin = AIOKafkaAdminClient(**kafka)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1)])
    finally:
        await admin.close()


async def _delete_topic(kafka: Mapping[str, Any], topic: str) -> None:
    admin = AIOKafkaAdminClient(**kafka)
    await admin.start()
    try:
        await admin.delete_topics([topic])
    finally:
        await admin.close()


async def _kafka_collector(
    kafka: Mapping[str, Any],
    topic: str,
    record: Callable[[str, str, float, float], None],
    *,
    own: bool,
) -> Callable[[], Any]:
    """Read results from `topic`, from its end: one made for this run (`own`: created now,
    deleted after) or an existing one."""
    if own:
        await _create_topic(kafka, topic)
    consumer = AIOKafkaConsumer(**kafka, isolation_level="read_committed", enable_auto_commit=False)
    await consumer.start()
    deadline = time.monotonic() + _METADATA_WAIT_S
    while not consumer.partitions_for_topic(topic):
        if time.monotonic() > deadline:
            await consumer.stop()
            raise LookupError(f"reply topic {topic!r} does not exist")
        await consumer._client.force_metadata_update()
        await asyncio.sleep(0.05)
    partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
    consumer.assign(partitions)
    for tp in partitions:
        await consumer.seek_to_end(tp)
        await consumer.position(tp)  # resolved now: nothing sent later can be skipped

    async def read() -> None:
        while True:
            fetched = await consumer.getmany(timeout_ms=100, max_records=4096)
            # A fetch's records all arrived now: timed per record, the last of a few thousand
            # would also count the time taken to read the others.
            received_at, now_ms = time.perf_counter(), time.time() * 1000
            for records in fetched.values():
                for r in records:
                    # A shared reply topic may hold others' records: what is not a result of
                    # this run is passed over, not the end of the reading.
                    fields = dict(r.headers)
                    request_id, status = fields.get(headers.REQUEST_ID), fields.get(headers.STATUS)
                    if request_id and status:
                        delivered_ms = now_ms - r.timestamp
                        record(
                            request_id.decode(errors="replace"),
                            status.decode(),
                            received_at,
                            delivered_ms,
                        )

    task = asyncio.create_task(read())

    async def stop() -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await consumer.stop()
        if own:
            await _delete_topic(kafka, topic)

    return stop


async def _redis_collector(
    url: str | None,
    key_prefix: str,
    run_id: str,
    content_type: str,
    record: Callable[[str, str, float], None],
) -> Callable[[], Any]:
    if not url:
        raise ValueError("Redis replies need a Redis URL")
    redis = Redis.from_url(url)
    pubsub = redis.pubsub()
    prefix = key_prefix.encode()  # the workers' [redis] key_prefix
    await pubsub.psubscribe(prefix + run_id.encode() + b"-*")
    await pubsub.get_message(timeout=5)  # the psubscribe confirmation

    async def read() -> None:
        async for message in pubsub.listen():
            if message["type"] == "pmessage":
                try:
                    result = read_redis_result(message["data"], content_type)
                    status = "ok" if isinstance(result, Prediction) else "error"
                except (DecodeError, ValueError):  # counted, and the reader reads on
                    status = "unreadable"
                request_id = message["channel"][len(prefix) :].decode()
                record(request_id, status, time.perf_counter())

    task = asyncio.create_task(read())

    async def stop() -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pubsub.aclose()
        await redis.aclose()

    return stop
