"""Lean fetched records: the same records, positions and skips as aiokafka's own reader, over
record batches built by aiokafka and over a real broker's fetches."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.consumer.fetcher import READ_COMMITTED, READ_UNCOMMITTED, FetchResult
from aiokafka.errors import CorruptRecordException
from aiokafka.producer import message_accumulator
from aiokafka.record import default_records
from aiokafka.record.legacy_records import LegacyRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords

from surge.producers import request_body, request_headers
from surge.schemas import MSGPACK
from surge.workers import fetched
from tests.conftest import WorkerProcess, topic_of, worker_env
from tests.helpers import create_topics, read_topic, record_batch

TP = TopicPartition("requests", 0)


def _batches(sizes: list[int], first: int = 0, compression: int = 0) -> bytes:
    """Record batches of these sizes, offsets running on from `first`, as a fetch holds them
    (`compression`: Kafka's codec id, 0 for none)."""
    data, offset = b"", first
    for size in sizes:
        records = [
            (
                None if i % 3 == 0 else f"k{offset + i}".encode(),
                b"v" * i,
                [("h", f"{offset + i}".encode())] * (i % 3),
                1_000 + i,
            )
            for i in range(size)
        ]
        data += record_batch(records, offset, compression)
        offset += size
    return data


class _Position:
    """A partition's assignment state, as a FetchResult reads and moves it."""

    active = True
    paused = False

    def __init__(self, position: int) -> None:
        self.position = position

    def state_value(self, tp: TopicPartition) -> _Position:
        return self

    def consumed_to(self, position: int) -> None:
        self.position = position


def _drain(kind: Any, data: bytes, fetch_offset: int, take: int) -> tuple[list[Any], list[int]]:
    """Every record of a fetch, taken `take` at a time as getmany takes them, and the
    consumer's position after each take."""
    position = _Position(fetch_offset)
    deserializer = fetched.lean_records if kind is fetched.LeanPartitionRecords else None
    read = fetched.Fetched(data) if deserializer else MemoryRecords(data)
    records = kind(TP, read, [], fetch_offset, deserializer, None, True, 0)
    result = FetchResult(TP, assignment=position, partition_records=records, backoff=0)
    taken: list[Any] = []
    positions = []
    while result.has_more():
        taken += result.getall(take)
        positions.append(position.position)
    return taken, positions


def _fields(record: Any) -> tuple[Any, ...]:
    return record.offset, record.timestamp, record.key, record.value, list(record.headers)


@pytest.mark.parametrize("take", [1, 7, 10, 25, 1024])
@pytest.mark.parametrize("fetch_offset", [100, 104])
@pytest.mark.parametrize("compression", [0, 1], ids=["plain", "gzip"])
def test_lean_records_match_aiokafkas_records_and_positions(
    take: int, fetch_offset: int, compression: int
) -> None:
    # A fetch may begin inside its first batch: the records before the position are skipped.
    data = _batches([10, 1, 14], first=100, compression=compression)
    ours, our_positions = _drain(fetched.LeanPartitionRecords, data, fetch_offset, take)
    theirs, their_positions = _drain(fetched._AIOKAFKA, data, fetch_offset, take)
    assert [_fields(r) for r in ours] == [_fields(r) for r in theirs]
    assert ours[0].offset == fetch_offset
    assert ours[-1].offset == 124
    assert our_positions == their_positions
    assert not isinstance(ours[0], ConsumerRecord)


def test_a_corrupt_batch_raises_as_aiokafkas_reader_does() -> None:
    data = bytearray(_batches([3, 3]))
    data[-1] ^= 0xFF  # inside the second batch's last record
    records = fetched.LeanPartitionRecords(
        TP, fetched.Fetched(bytes(data)), [], 0, fetched.lean_records, None, True, READ_UNCOMMITTED
    )
    taken = []
    with pytest.raises(CorruptRecordException):
        taken.extend(records)
    assert [r.offset for r in taken] == [0, 1, 2]


@pytest.mark.parametrize("magic", [0, 1])
@pytest.mark.parametrize("compression", [0, 1], ids=["plain", "gzip"])
def test_messages_of_the_older_formats_are_read_and_checked_as_aiokafka_does(
    magic: int, compression: int
) -> None:
    builder = LegacyRecordBatchBuilder(magic, compression, 1 << 20)
    for offset in range(3):
        builder.append(offset, timestamp=5 if magic else None, key=b"k", value=b"v%d" % offset)
    data = bytes(builder.build())
    ours, _ = _drain(fetched.LeanPartitionRecords, data, 0, 1024)
    theirs, _ = _drain(fetched._AIOKAFKA, data, 0, 1024)
    assert [_fields(r) for r in ours] == [_fields(r) for r in theirs]
    assert [r.value for r in ours] == [b"v0", b"v1", b"v2"]
    corrupt = bytearray(data)
    corrupt[-1] ^= 0xFF  # the last message's value (plain) or the compressed bytes (gzip)
    with pytest.raises(CorruptRecordException):
        _drain(fetched.LeanPartitionRecords, bytes(corrupt), 0, 1024)


class _RawName(str):
    """A header name as a client other than Java's may write it: bytes that are not UTF-8."""

    def encode(self, *args: object, **kwargs: object) -> bytes:
        return b"trace\xff\xfe"


def _with_raw_name(first: int, compression: int = 0) -> bytes:
    """A record batch of three records, the second with a header name that is not UTF-8."""
    builder = default_records._DefaultRecordBatchBuilderPy(2, compression, 0, -1, -1, -1, 1 << 20)
    for delta in range(3):
        fields = [("surge-model", b"mlp")]
        if delta == 1:
            fields.append((_RawName("x"), b"1"))
        builder.append(delta, 1_000 + delta, f"k{delta}".encode(), b"v" * delta, fields)
    batch = bytearray(builder.build())
    batch[:8] = first.to_bytes(8, "big")
    return bytes(batch)


@pytest.mark.parametrize("compression", [0, 1], ids=["plain", "gzip"])
def test_a_header_name_that_is_not_utf8_is_read_as_javas_client_reads_it(
    compression: int,
) -> None:
    """aiokafka's C reader refuses the whole batch; read again, the odd name has its invalid
    bytes replaced, and every record and position is as if it had been UTF-8."""
    data = _batches([2], first=0) + _with_raw_name(2, compression) + _batches([2], first=5)
    with pytest.raises(UnicodeDecodeError):
        _drain(fetched._AIOKAFKA, data, 0, 1024)
    ours, positions = _drain(fetched.LeanPartitionRecords, data, 0, 2)
    assert [r.offset for r in ours] == list(range(7))
    assert positions == [2, 4, 6, 7]
    odd = ours[3]
    assert (odd.key, odd.value, odd.timestamp) == (b"k1", b"v", 1_001)
    assert odd.headers == [("surge-model", b"mlp"), ("trace\ufffd\ufffd", b"1")]
    assert ours[2].headers == [("surge-model", b"mlp")]


def test_install_keeps_other_consumers_as_aiokafka_makes_them() -> None:
    assert fetched.install()
    assert fetched.install()
    from aiokafka.consumer import fetcher

    assert fetcher.MemoryRecords is fetched.Fetched
    args = (TP, fetcher.MemoryRecords(_batches([2])), [], 0)
    lean = fetcher.PartitionRecords(*args, fetched.lean_records, None, True, READ_COMMITTED)
    plain = fetcher.PartitionRecords(*args, None, None, True, READ_COMMITTED)
    assert type(lean) is fetched.LeanPartitionRecords
    assert type(plain) is fetched._AIOKAFKA
    assert isinstance(next(plain), ConsumerRecord)


@pytest.mark.integration
async def test_a_worker_reads_lean_records_and_skips_aborted_transactions(
    kafka: str, model_root: Path, worker_processes: Callable[[dict[str, str]], WorkerProcess]
) -> None:
    """Requests of an aborted transaction between committed ones: only the committed are
    answered, each once, by a worker whose consumer reads lean records."""
    env = worker_env(kafka, model_root, None)
    topic, replies = topic_of(env, "mlp"), f"test.replies.{uuid.uuid4().hex[:8]}"
    await create_topics(kafka, topic, partitions=1)
    await create_topics(kafka, replies, partitions=1)
    route = request_headers(model="mlp", content_type=MSGPACK, reply_to=replies)
    producer = AIOKafkaProducer(bootstrap_servers=kafka, transactional_id=uuid.uuid4().hex)
    await producer.start()
    try:
        for round_, commit in enumerate([True, False, True, False, True]):
            async with producer.transaction() if commit else _aborted(producer):
                for i in range(20):
                    request_id = f"{round_}-{i}"
                    body = request_body({"x": np.ones((1, 32), np.float32)}, request_id, MSGPACK)
                    await producer.send(topic, body, key=request_id.encode(), headers=route)
    finally:
        await producer.stop()
    worker = worker_processes(env)
    answered = await read_topic(kafka, replies, until=60, timeout=60)
    assert sorted(answered) == sorted(f"{r}-{i}" for r in (0, 2, 4) for i in range(20))
    assert all(len(results) == 1 for results in answered.values())
    assert worker.terminate() == 0
    assert not any(e.get("event") == "lean_records_unavailable" for e in worker.events())


@pytest.mark.integration
async def test_a_request_with_a_header_name_that_is_not_utf8_is_answered_as_are_those_after_it(
    kafka: str,
    model_root: Path,
    worker_processes: Callable[[dict[str, str]], WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A header name Java's client could not write, but others can: it must not stop the
    partition, for this worker or the next."""
    env = worker_env(kafka, model_root, None)
    topic, replies = topic_of(env, "mlp"), f"test.replies.{uuid.uuid4().hex[:8]}"
    await create_topics(kafka, topic, replies, partitions=1)
    route = request_headers(model="mlp", content_type=MSGPACK, reply_to=replies)
    x = {"x": np.ones((1, 32), np.float32)}
    # aiokafka's Python record builder, which encodes a header name with its own `encode`.
    monkeypatch.setattr(
        message_accumulator,
        "DefaultRecordBatchBuilder",
        default_records._DefaultRecordBatchBuilderPy,
    )
    producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all")
    await producer.start()
    try:
        batch = producer.create_batch()
        for request_id in ("before", "odd", "after"):
            fields = [*route, (_RawName("x"), b"1")] if request_id == "odd" else route
            body = request_body(x, request_id, MSGPACK)
            assert batch.append(key=request_id.encode(), value=body, timestamp=None, headers=fields)
        await (await producer.send_batch(batch, topic, partition=0))
    finally:
        await producer.stop()
    worker = worker_processes(env)
    answered = await read_topic(kafka, replies, until=3, timeout=60)
    assert sorted(answered) == ["after", "before", "odd"]
    assert all(r.headers["surge-status"] == b"ok" for [r] in answered.values())
    assert worker.terminate() == 0
    assert any(e.get("event") == "header_name_not_utf8" for e in worker.events())


class _aborted:
    """A transaction that is aborted at the end of its block."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer

    async def __aenter__(self) -> None:
        await self._producer.begin_transaction()

    async def __aexit__(self, *exc: object) -> None:
        await self._producer.abort_transaction()


async def test_a_plain_consumer_beside_a_worker_still_gets_consumer_records(kafka: str) -> None:
    fetched.install()
    topic = f"test.plain.{uuid.uuid4().hex[:8]}"
    await create_topics(kafka, topic, partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka)
    await producer.start()
    await producer.send_and_wait(topic, b"v", key=b"k")
    await producer.stop()
    for deserializer, kind in [(None, ConsumerRecord), (fetched.lean_records, None)]:
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=kafka,
            auto_offset_reset="earliest",
            key_deserializer=deserializer,
        )
        await consumer.start()
        try:
            [records] = (await consumer.getmany(timeout_ms=10_000)).values()
        finally:
            await consumer.stop()
        assert (records[0].key, records[0].value) == (b"k", b"v")
        assert isinstance(records[0], ConsumerRecord) == (kind is ConsumerRecord)
