"""Record batches built whole from alike records: the bytes aiokafka's builder writes for the
same records, cut where its batches end, and read back from a real broker as written."""

from __future__ import annotations

import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from hypothesis import given, settings
from hypothesis import strategies as st

from surge.schemas import headers
from surge.workers.record_batches import Alike, crc_ok
from surge.workers.writes import Records, Write, _batch_layout, send_batches
from tests.helpers import create_topics, make_ticket

STAMP = 1_765_000_000_123
COMMON = [
    ("surge-status", b"ok"),
    ("content-type", b"application/msgpack"),
    ("surge-model", b"mlp"),
    ("empty", None),
]


def _aiokafka_batches(
    keys: list[bytes],
    values: list[bytes],
    ids: list[bytes],
    common: list[tuple[str, bytes | None]],
    batch_size: int,
    transactional: bool,
) -> list[tuple[bytes, int, int]]:
    """What aiokafka's builder makes of the same records, appended until one is refused."""
    built, start = [], 0
    while start < len(keys):
        builder, end = BatchBuilder(batch_size, 0, is_transactional=transactional), start
        while end < len(keys) and builder.append(
            key=keys[end],
            value=values[end],
            timestamp=STAMP,
            headers=[(headers.REQUEST_ID, ids[end]), *common],
        ):
            end += 1
        builder._set_producer_state(7, 3, 1000 + start)
        built.append((bytes(builder._build()), start, end))
        start = end
    return built


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 300),
    st.integers(0, 70),
    st.integers(0, 300),
    st.integers(0, 80),
    st.integers(0, len(COMMON)),
    st.sampled_from([100, 1_000, 5_000, 1 << 18]),
    st.booleans(),
    st.randoms(use_true_random=False),
)
def test_alike_records_make_the_bytes_aiokafkas_builder_makes(
    count: int,
    key_length: int,
    value_length: int,
    id_length: int,
    common: int,
    batch_size: int,
    transactional: bool,
    rng: object,
) -> None:
    def column(length: int) -> list[bytes]:
        return [rng.randbytes(length) for _ in range(count)]  # type: ignore[attr-defined]

    keys, values, ids = column(key_length), column(value_length), column(id_length)
    ours = Alike(keys, values, headers.REQUEST_ID, ids, COMMON[:common])
    built = ours.batches(batch_size, STAMP, transactional)
    for batch, start, _ in built:
        batch._set_producer_state(7, 3, 1000 + start)
    expected = _aiokafka_batches(keys, values, ids, COMMON[:common], batch_size, transactional)
    assert [(bytes(b._build()), s, e) for b, s, e in built] == expected
    assert [batch.record_count() for batch, _, _ in built] == [e - s for _, s, e in expected]
    assert all(crc_ok(data) for data, _, _ in expected)


def test_a_batch_stays_under_its_size_as_aiokafkas_do() -> None:
    keys = [b"%032d" % i for i in range(9)]
    ((one, _, _),) = Alike(keys[:1], keys[:1], headers.REQUEST_ID, keys[:1], COMMON).batches(
        1 << 20, STAMP
    )
    exactly_three = one.size() + 2 * (one.size() - 61)  # the header, and three records
    built = Alike(keys, keys, headers.REQUEST_ID, keys, COMMON).batches(exactly_three, STAMP)
    assert [(start, end) for _, start, end in built] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9)]
    expected = _aiokafka_batches(keys, keys, keys, COMMON, exactly_three, False)
    assert [(start, end) for _, start, end in expected] == [(s, e) for _, s, e in built]


def test_offset_deltas_past_8191_take_three_bytes_as_aiokafkas_do() -> None:
    count = 9_000
    keys = [b"%05d" % i for i in range(count)]
    built = Alike(keys, keys, headers.REQUEST_ID, keys, []).batches(1 << 24, STAMP)
    expected = _aiokafka_batches(keys, keys, keys, [], 1 << 24, False)
    built[0][0]._set_producer_state(7, 3, 1000)
    assert [(bytes(b._build()), s, e) for b, s, e in built] == expected
    records = list(MemoryRecords(bytes(built[0][0]._build())).next_batch())
    assert [r.offset for r in records] == list(range(count))
    assert records[-1].key == b"08999"


def test_a_batch_no_producer_state_is_set_on_is_aiokafkas_too() -> None:
    keys = [b"%08d" % i for i in range(20)]
    ((ours, _, _),) = Alike(keys, keys, headers.REQUEST_ID, keys, COMMON).batches(1 << 20, STAMP)
    theirs = BatchBuilder(1 << 20, 0)
    for key in keys:  # as a producer without idempotence sends them
        fields = [(headers.REQUEST_ID, key), *COMMON]
        theirs.append(key=key, value=key, timestamp=STAMP, headers=fields)
    assert ours._build() == theirs._build()


def test_a_changed_byte_fails_the_checksum() -> None:
    ((batch, _, _),) = Alike([b"k"] * 8, [b"v"] * 8, headers.REQUEST_ID, [b"i"] * 8, []).batches(
        1 << 20, STAMP
    )
    data = batch._build()
    assert crc_ok(data)
    data[-1] ^= 1
    assert not crc_ok(data)


def _results(count: int, *, id_length: int = 32) -> Records:
    """A batch's results as `Replies.ok_bodies` hands them over."""
    records = Records("replies")
    for index in range(count):
        request_id = f"{index:0{id_length}d}".encode()
        records.tickets.append(make_ticket(b"{}", key=request_id))
        records.keys.append(request_id)
        records.values.append(b"body-%06d" % index)
        records.ids.append(request_id)
        records.headers.append(COMMON)
        records.writes.append(None)
    return records


def test_only_results_of_one_layout_are_built_whole() -> None:
    assert _results(8).alike() is not None
    assert _results(7).alike() is None  # few: aiokafka's builder costs less
    retried = _results(8)
    retried.write(3)
    assert retried.alike() is not None  # results as `Write`s, exactly once's way
    retried.write(3).alone = True
    assert retried.alike() is None  # over the size limit beside others
    other_headers = _results(8)
    other_headers.headers[5] = [("surge-status", b"error")]
    assert other_headers.alike() is None
    longer_id = _results(8)
    longer_id.ids[2] += b"x"
    assert longer_id.alike() is None
    longer_value = _results(8)
    longer_value.values[7] += b"x"
    assert longer_value.alike() is None
    joined = _results(8)
    joined.add(Write(make_ticket(b"{}"), "replies", b"body-999999", [], False, b"k" * 32))
    assert joined.alike() is None  # a record without a request id: a dead letter
    unnamed = Records("dead")
    unnamed.add(Write(make_ticket(b"{}"), "dead", b"v", [(headers.REQUEST_ID, None)], True))
    assert unnamed.full_headers(0) == [(headers.REQUEST_ID, None)]  # kept as it came
    rebuilt = Records("replies")
    for write in _results(8).all_writes():
        rebuilt.add(write)
    assert rebuilt.alike() is not None
    assert [rebuilt.full_headers(i) for i in range(8)] == [w.headers for w in rebuilt.writes]


@pytest.mark.integration
async def test_results_built_whole_are_read_back_from_kafka_as_written(kafka: str) -> None:
    topic = f"surge.built-{uuid.uuid4().hex[:8]}"
    await create_topics(kafka, topic, partitions=1)
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka, acks="all", enable_idempotence=True, max_batch_size=16_384
    )
    await producer.start()
    try:
        records = _results(500)  # several record batches, deltas of one and two bytes
        assert records.alike() is not None
        assert _batch_layout(producer) == (16_384, False)  # so built whole
        sent = await send_batches(producer, topic, 0, records)
        assert len(sent) > 1
        for part, delivery in sent:
            assert not isinstance(delivery, BaseException)
            metadata = await delivery
            assert metadata.offset == int(part.keys[0])  # in order, each record once
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    try:
        read = []
        while len(read) < 500:
            for batch in (await consumer.getmany(timeout_ms=5_000)).values():
                read += batch
    finally:
        await consumer.stop()
    assert [r.key for r in read] == records.keys
    assert [r.value for r in read] == records.values
    assert all(list(r.headers) == [(headers.REQUEST_ID, r.key), *COMMON] for r in read)
    assert {r.offset for r in read} == set(range(500))
