"""Plain-Kafka helpers for tests: publish records and read results without Surge's client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.structs import ConsumerRecord
from redis.asyncio import Redis

from surge.config import load_settings
from surge.examples import MLP_FEATURES
from surge.producers import request_body, request_headers
from surge.schemas import MSGPACK
from surge.workers.ledger import Ledger
from surge.workers.tickets import Ticket
from surge.workers.worker import Worker
from surge.workers.writes import Write

Headers = list[tuple[str, bytes]]


@dataclass
class Reply:
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]
    timestamp: int  # ms: the create time a producer stamps, or the broker's append time


async def create_topics(
    bootstrap: str, *names: str, partitions: int = 4, configs: dict[str, str] | None = None
) -> None:
    """Topics not there yet, one replica each, with these topic `configs` (e.g.
    max.message.bytes)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(n, partitions, 1, topic_configs=configs or {})
            for n in names
            if n not in existing
        ]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(new)
    finally:
        await admin.close()


# One MLP request line a topic of `SMALL_TOPIC_CONFIGS` takes, and one it refuses (5 KB of
# float32, fine for the model): the broker, not the client, refuses it.
SMALL_LINE = json.dumps({"x": [[0.5] * 32]})
LARGE_LINE = json.dumps({"x": [[0.5] * 32] * 40})
SMALL_TOPIC_CONFIGS = {"max.message.bytes": "3000"}


async def publish(
    bootstrap: str,
    records: Iterable[tuple[str, bytes | None, bytes, Headers]],
    *,
    rate: float | None = None,
) -> None:
    """Publish (topic, key, value, headers) records with a plain aiokafka producer, all at
    once or at `rate` records per second. Idempotent: a send retried across a broker restart
    must not write a request twice, which would count as a duplicate result of the worker's."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, enable_idempotence=True
    )
    await producer.start()
    try:
        started = time.monotonic()
        deliveries = []
        for i, (topic, key, value, headers) in enumerate(records):
            if rate and (ahead := started + i / rate - time.monotonic()) > 0.002:
                await asyncio.sleep(ahead)
            deliveries.append(await producer.send(topic, value, key=key, headers=headers))
        await asyncio.gather(*deliveries)
    finally:
        await producer.stop()


def mlp_requests(
    topic: str, run: str, count: int, reply_to: str
) -> list[tuple[str, bytes, bytes, Headers]]:
    """`count` msgpack MLP requests to `topic`, keyed and identified `{run}-{i}`, each
    answered to `reply_to`: records for `publish`."""
    x = {"x": np.ones((1, MLP_FEATURES), np.float32)}
    route = request_headers(model="mlp", content_type=MSGPACK, reply_to=reply_to)
    return [
        (topic, f"{run}-{i}".encode(), request_body(x, f"{run}-{i}", MSGPACK), route)
        for i in range(count)
    ]


@contextlib.asynccontextmanager
async def _from_beginning(bootstrap: str, topic: str) -> AsyncIterator[AIOKafkaConsumer]:
    """A read_committed consumer assigned every partition of `topic`, at its beginning."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False
    )
    await consumer.start()
    try:
        while not consumer.partitions_for_topic(topic):
            await consumer._client.force_metadata_update()
            consumer._client.add_topic(topic)
            await asyncio.sleep(0.05)
        assigned = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        yield consumer
    finally:
        await consumer.stop()


async def _read_into(
    consumer: AIOKafkaConsumer, seen: dict[str, list[Reply]], key_of: str | None, wait_ms: int
) -> None:
    for records in (await consumer.getmany(timeout_ms=wait_ms, max_records=5000)).values():
        for r in records:
            reply = Reply(r.key, r.value, dict(r.headers), r.timestamp)
            seen[_key(reply, key_of)].append(reply)


async def read_topic(
    bootstrap: str,
    topic: str,
    *,
    until: int,
    timeout: float = 60,
    key_of: str | None = "surge-request-id",
) -> dict[str, list[Reply]]:
    """Read `topic` from the beginning until `until` distinct keys are seen: the values of
    header `key_of`, or the records' Kafka keys when it is None."""
    seen: dict[str, list[Reply]] = defaultdict(list)
    async with _from_beginning(bootstrap, topic) as consumer:
        deadline = time.monotonic() + timeout
        while len(seen) < until and time.monotonic() < deadline:
            await _read_into(consumer, seen, key_of, 200)
        await _read_into(consumer, seen, key_of, 300)  # stragglers (duplicates) too
    return dict(seen)


async def read_to_end(
    bootstrap: str, topic: str, *, key_of: str | None = "surge-request-id", timeout: float = 60
) -> dict[str, list[Reply]]:
    """Every committed record of `topic`, up to its last stable offset, by key (as in
    `read_topic`): for counting results exactly, once all writers are done."""
    seen: dict[str, list[Reply]] = defaultdict(list)
    async with _from_beginning(bootstrap, topic) as consumer:
        deadline = time.monotonic() + timeout
        assigned = list(consumer.assignment())
        ends = await consumer.end_offsets(assigned)  # read_committed: the last stable offsets
        while [tp for tp in assigned if await consumer.position(tp) < ends[tp]]:
            assert time.monotonic() < deadline, f"{topic} not read to its end in {timeout} s"
            await _read_into(consumer, seen, key_of, 200)
    return dict(seen)


def _key(reply: Reply, key_of: str | None) -> str:
    raw = reply.key if key_of is None else reply.headers.get(key_of)
    return (raw or b"").decode()


async def read_redis(
    url: str, ids: Sequence[str], *, prefix: str = "surge:result:", timeout: float = 60
) -> dict[str, bytes]:
    redis = Redis.from_url(url)
    try:
        deadline = time.monotonic() + timeout
        found: dict[str, bytes] = {}
        while len(found) < len(ids) and time.monotonic() < deadline:
            missing = [i for i in ids if i not in found]
            values = await redis.mget([prefix + i for i in missing])
            found |= {i: v for i, v in zip(missing, values, strict=True) if v is not None}
            if len(found) < len(ids):
                await asyncio.sleep(0.1)
        return found
    finally:
        await redis.aclose()


async def committed_lag(
    bootstrap: str, group: str, topic: str, only: Collection[int] | None = None
) -> int:
    """End offsets minus the group's committed offsets, summed over the topic's partitions
    (those numbered in `only`, if given)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
        while not consumer.partitions_for_topic(topic):  # metadata for this topic, for sure
            await consumer._client.force_metadata_update()
            consumer._client.add_topic(topic)
            await asyncio.sleep(0.05)
        numbers = consumer.partitions_for_topic(topic)
        partitions = [TopicPartition(topic, p) for p in numbers if only is None or p in only]
        ends = await consumer.end_offsets(partitions)
        return sum(
            ends[tp] - max(committed[tp].offset if tp in committed else 0, 0) for tp in partitions
        )
    finally:
        await consumer.stop()
        await admin.close()


async def wait_committed(
    bootstrap: str,
    group: str,
    topic: str,
    timeout: float = 30,
    only: Collection[int] | None = None,
) -> None:
    """Wait until the group has committed every record of the topic (of its partitions
    numbered in `only`, if given); fail if it never does (a stuck partition)."""
    deadline = time.monotonic() + timeout
    while (lag := await committed_lag(bootstrap, group, topic, only)) > 0:
        assert time.monotonic() < deadline, f"{lag} records never committed: a partition is stuck"
        await asyncio.sleep(0.1)


def make_ticket(
    body: bytes,
    content_type: str = "application/json",
    *,
    key: bytes = b"k",
    headers: list[tuple[str, bytes]] | None = None,
) -> Ticket:
    """A ticket as the router would make it for a record with this body, key and headers."""
    headers = headers or []
    return Ticket(
        tp=TopicPartition("t", 0),
        offset=0,
        key=key,
        value=body,
        headers=headers,
        request_id="k",
        model="m",
        version=None,
        reply_to="out",
        content_type=content_type,
        deadline_ms=None,
        received=time.monotonic(),
        size=len(body) + len(key) + sum(len(k) + len(v) for k, v in headers),
    )


def reference(model_path: str, x: np.ndarray) -> np.ndarray:
    """The model's output for `x`, from ONNX Runtime directly."""
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


async def serving_worker(
    model_root: Path, topic: str, ledger: Ledger, kafka_sink: Callable[[Write], None]
) -> Worker:
    """A worker's serving path as `Worker._start` builds it, without Kafka or Redis: the
    models in `model_root` (the MLP on `topic`), outcomes tracked in `ledger`, Kafka writes
    handed to `kafka_sink`. Feed it with `Worker.intake`."""
    settings = load_settings(
        env={
            "SURGE_WORKER__MODEL_ROOT": str(model_root),
            "SURGE_WORKER__TOPICS": f'{{"mlp": "{topic}"}}',
        }
    )
    worker = Worker(settings)
    worker._redis = None
    worker._ledger = ledger
    await worker.serve_models(kafka_sink)
    return worker


def record_batch(
    records: Iterable[tuple[bytes | None, bytes | None, Sequence[tuple[str, bytes]], int]],
    first_offset: int,
    compression: int = 0,
) -> bytes:
    """One record batch of (key, value, headers, timestamp) records, offsets from
    `first_offset`, as a broker returns it in a fetch (`compression`: Kafka's codec id)."""
    builder = DefaultRecordBatchBuilder(2, compression, 0, -1, -1, -1, 1 << 24)
    for delta, (key, value, fields, timestamp) in enumerate(records):
        builder.append(delta, timestamp, key, value, list(fields))
    batch = bytearray(builder.build())
    batch[:8] = first_offset.to_bytes(8, "big")  # the base offset, which the CRC leaves out
    return bytes(batch)


def mlp_fetch(
    topic: str,
    partitions: int,
    per_partition: int,
    *,
    first_offset: int = 0,
    timestamp: int | Literal["now"] | None = "now",
    rows: np.ndarray | None = None,
) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
    """One fetch of msgpack MLP requests as getmany returns it: on each partition, offsets from
    `first_offset`, keyed (and identified) `<partition>-<offset>`, stamped `timestamp` (ms;
    None: unstamped, as old record formats are), each request one row of `rows` (by offset;
    default ones)."""
    route = tuple(request_headers(model="mlp", content_type=MSGPACK, reply_to="replies"))
    if rows is None:
        rows = np.ones((1, 1, MLP_FEATURES), np.float32)
    stamp = int(time.time() * 1000) if timestamp == "now" else timestamp
    fetch = {}
    for partition in range(partitions):
        records = []
        for offset in range(first_offset, first_offset + per_partition):
            key = f"{partition}-{offset}"
            value = request_body({"x": rows[offset % len(rows)]}, key, MSGPACK)
            size = len(value)
            records.append(
                ConsumerRecord(  # headers a tuple of its own, as aiokafka gives each record
                    topic,
                    partition,
                    offset,
                    stamp,
                    0,
                    key.encode(),
                    value,
                    None,
                    4,
                    size,
                    (*route,),
                )
            )
        fetch[TopicPartition(topic, partition)] = records
    return fetch


class Peaks:
    """The largest value each reader gave while the block ran, sampled every `every_s` (0:
    every turn of the event loop): `Peaks(records=lambda: ledger.records)["records"]`."""

    def __init__(self, every_s: float = 0.0, **readers: Callable[[], float]) -> None:
        self._every_s, self._readers = every_s, readers
        self._peaks = dict.fromkeys(readers, 0.0)
        self._sampler: asyncio.Task[None] | None = None

    def __getitem__(self, name: str) -> float:
        return self._peaks[name]

    async def __aenter__(self) -> Peaks:
        self._sampler = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._sampler is not None
        self._sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._sampler  # a reader that raised stopped the sampling: fail, not pass

    async def _sample(self) -> None:
        while True:
            for name, read in self._readers.items():
                self._peaks[name] = max(self._peaks[name], read())
            await asyncio.sleep(self._every_s)
