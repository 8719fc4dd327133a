"""A batch's results as one `Records`: split by partition and into record batches without
losing, reordering or repeating any, and a `Write` made only for a record that needs one."""

from __future__ import annotations

import asyncio

from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.memory_records import MemoryRecords

from surge.workers.partitioning import key_partitions
from surge.workers.transactions import _by_ownership, _split_at
from surge.workers.writes import Records, Write, by_topic, send_batches, split_by_key
from tests.helpers import make_ticket


def _records(topic: str, count: int, start: int = 0) -> Records:
    records = Records(topic)
    for offset in range(start, start + count):
        ticket = make_ticket(b"{}")
        ticket.offset = offset
        records.tickets.append(ticket)
        records.keys.append(f"id-{offset}".encode())
        records.values.append(f"result-{offset}".encode())
        records.ids.append(None)
        records.headers.append(_headers(offset))
    records.writes = [None] * count
    return records


class _Producer:
    """Real record batches sized to hold `size` of `_records`' records: what went in each,
    read back from their bytes."""

    def __init__(self, size: int) -> None:
        probe, sizes = BatchBuilder(1 << 20, 0), []
        for record in range(size + 1):
            probe.append(key=b"id-0", value=b"result-0", timestamp=0, headers=_headers(record))
            sizes.append(probe.size())
        self.batch_bytes = (sizes[-2] + sizes[-1]) // 2  # room for `size`, not one more
        self.sent: list[list[bytes]] = []

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(self.batch_bytes, 0)

    async def send_batch(
        self, batch: BatchBuilder, topic: str, partition: int
    ) -> asyncio.Future[None]:
        count = batch.record_count()  # the producer's sequence numbers move by this
        records = MemoryRecords(bytes(batch._build()))
        batch_records = list(records.next_batch())
        assert not records.has_next()
        assert [record.offset for record in batch_records] == list(range(count))
        self.sent.append([record.value for record in batch_records])
        return asyncio.get_running_loop().create_future()


def _headers(offset: int) -> list[tuple[str, bytes]]:
    return [("surge-request-id", f"id-{offset}".encode())]


async def test_records_fill_record_batches_in_order_each_part_with_its_own_tickets() -> None:
    records = _records("replies", 10)
    lonely = records.write(4)
    lonely.alone = True  # over the size limit in a batch with others before: alone now
    producer = _Producer(size=3)
    sent = await send_batches(producer, "replies", 0, records)  # type: ignore[arg-type]
    expected = [[0, 1, 2], [3], [4], [5, 6, 7], [8, 9]]
    assert producer.sent == [[f"result-{i}".encode() for i in batch] for batch in expected]
    assert [[t.offset for t in part.tickets] for part, _ in sent] == expected
    assert sent[2][0].writes == [lonely]  # its own Write, with its attempts' state


def test_a_first_attempt_gets_a_write_only_when_asked_and_keeps_it() -> None:
    records = _records("replies", 3)
    assert records.writes == [None, None, None]
    write = records.write(1)
    assert (write.ticket, write.topic, write.key, write.value, write.headers) == (
        records.tickets[1],
        "replies",
        b"id-1",
        b"result-1",
        records.headers[1],
    )
    assert not write.dead_letter
    assert records.write(1) is write
    assert records.all_writes()[1] is write


def test_records_and_writes_join_by_topic_and_split_by_key_as_kafka_would() -> None:
    first, other = _records("replies", 40), _records("other", 2, start=100)
    retry = Write(make_ticket(b"{}"), "replies", b"again", [], dead_letter=False, key=b"id-x")
    topics = by_topic([first, other, retry])
    assert list(topics) == ["replies", "other"]
    joined = topics["replies"]
    assert topics["other"] is other  # alone of its topic: as it is
    assert joined is not first  # joined with others: new, the ones given unchanged
    assert len(first) == 40
    assert joined.values == [*first.values, b"again"]
    assert joined.writes[-1] is retry
    assert by_topic([first])["replies"] is first

    parts = split_by_key(joined, [0, 1, 2, 3])
    chosen = key_partitions(joined.keys, [0, 1, 2, 3])
    for partition, part in parts.items():
        expected = [key for key, p in zip(joined.keys, chosen, strict=True) if p == partition]
        assert part.keys == expected
        assert [joined.keys.index(key) for key in part.keys] == sorted(
            joined.keys.index(key) for key in part.keys
        )
    assert sum(map(len, parts.values())) == len(joined)
    assert split_by_key(other, [0]) == {0: other}


def test_outcomes_split_at_a_commit_position_and_by_input_partition() -> None:
    batch = _records("replies", 6)
    for ticket, offset in zip(batch.tickets, [3, 7, 4, 9, 5, 8], strict=True):
        ticket.offset = offset
    lone = Write(make_ticket(b"{}"), "replies", b"alone", [], dead_letter=False)
    lone.ticket.offset = 2
    below, rest = _split_at([lone, batch], 6)
    assert below[0] is lone
    assert [t.offset for t in below[1].tickets] == [3, 4, 5]
    assert below[1].values == [b"result-0", b"result-2", b"result-4"]
    assert [t.offset for t in rest[0].tickets] == [7, 9, 8]
    assert _split_at([batch], 10) == ([batch], [])
    assert _split_at([batch], 3) == ([], [batch])

    owners = [object(), object()]
    for index, ticket in enumerate(batch.tickets):
        ticket.tracking = owners[index % 2]
    parts = _by_ownership(batch)
    assert [[t.tracking for t in p.tickets] for p in parts] == [[owners[0]] * 3, [owners[1]] * 3]
    assert [p.values for p in parts] == [batch.values[0::2], batch.values[1::2]]
    for ticket in batch.tickets:
        ticket.tracking = owners[0]
    assert _by_ownership(batch) == [batch]
