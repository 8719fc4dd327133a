"""A fetch's records as its record batches hold them, handed over a batch at a time.

aiokafka makes a `ConsumerRecord` of every fetched record in Python: a generator step and two
calls per record, a fifth of a busy worker's event loop. A consumer made with
`key_deserializer=lean_records` gets instead the records that aiokafka's batch reader builds
in C (offset, timestamp, key, value, headers), unpacked a record batch at a time and handed
over by a C iterator. They carry no topic or partition: `getmany` gives those as the key of
their list. Every other consumer in the process gets its records as aiokafka makes them.

A record batch the C reader refuses for a header name that is not UTF-8 (some clients write
any bytes there, and the broker keeps them) is read again in Python, with such names decoded
as Kafka's Java client decodes them, invalid bytes replaced: one odd header must not stop a
partition for good.

Where aiokafka's fetcher is not built as this expects (another release), `install` leaves it
alone and `lean_records` only passes keys through: the records are `ConsumerRecord`s again.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterator
from typing import Any

import structlog
from aiokafka.consumer import fetcher
from aiokafka.errors import CorruptRecordException
from aiokafka.record import default_records

from surge.workers.record_batches import crc_ok

log = structlog.get_logger("surge.fetched")

_AIOKAFKA = fetcher.PartitionRecords
_MEMORY_RECORDS = fetcher.MemoryRecords
_BATCH_HEADER = 12  # a record batch's base offset (8 bytes) and length (4), before the rest
_MAGIC_AT = 16  # the format's version, in every format


class Fetched:
    """A partition's fetched bytes, read by aiokafka's `MemoryRecords`, with the bytes of the
    record batch read last: for reading that batch again another way."""

    __slots__ = ("_next", "_view", "last", "records")

    def __init__(self, raw: bytes) -> None:
        self.records = _MEMORY_RECORDS(raw)
        self._view = memoryview(raw)
        self._next = 0  # where the next batch begins
        self.last = self._view[:0]

    def has_next(self) -> bool:
        return self.records.has_next()  # type: ignore[no-any-return]

    def size_in_bytes(self) -> int:
        return self.records.size_in_bytes()  # type: ignore[no-any-return]

    def next_batch(self) -> Any:
        batch = self.records.next_batch()
        start = self._next
        length = int.from_bytes(self._view[start + 8 : start + _BATCH_HEADER], "big")
        self._next = start + _BATCH_HEADER + length
        self.last = self._view[start : self._next]
        return batch


class _Replacing(bytearray):
    """Bytes whose slices decode invalid UTF-8 as replacement characters."""

    def __getitem__(self, index: Any) -> Any:
        item = super().__getitem__(index)
        return _Replacing(item) if isinstance(index, slice) else item

    def decode(self, encoding: str = "utf-8", errors: str = "replace") -> str:
        return super().decode(encoding, "replace")


def read_leniently(raw: bytes | memoryview) -> list[Any]:
    """A record batch's records, header names that are not UTF-8 decoded with replacement
    characters; aiokafka's Python reader reads the rest, and refuses what it refuses."""
    batch = default_records._DefaultRecordBatchPy(raw)
    batch._maybe_uncompress()
    batch._buffer = _Replacing(batch._buffer)
    return list(batch)


def lean_records(key: bytes | None) -> bytes | None:
    """The key deserializer that asks for lean records; keys pass unchanged."""
    return key


class LeanPartitionRecords(_AIOKAFKA):  # type: ignore[misc,valid-type]
    """One partition's share of a fetch. aiokafka reads `next_fetch_offset` after taking
    any number of records (to move the consumer's position), so it is worked out from how
    many of the current batch's records the iterator has handed over."""

    _position: int  # where the current batch begins (or, with none, the next would)
    _batch: list[Any]  # the current batch's records
    _left: Iterator[Any]  # those not yet handed over
    _after: int  # the position past the current batch

    def _unpack_records(self) -> Iterator[Any]:  # aiokafka's constructor calls this
        return itertools.chain.from_iterable(self._batches())

    def __iter__(self) -> Iterator[Any]:
        return self._records_iterator  # type: ignore[no-any-return]

    @property
    def next_fetch_offset(self) -> int:
        taken = len(self._batch) - operator.length_hint(self._left)
        if taken == 0:
            return self._position
        if taken == len(self._batch):
            return self._after
        return self._batch[taken - 1].offset + 1  # type: ignore[no-any-return]

    @next_fetch_offset.setter
    def next_fetch_offset(self, position: int) -> None:
        self._position = position
        self._batch = []
        self._left = iter(self._batch)

    def _batches(self) -> Iterator[Iterator[Any]]:
        """Each batch's records as an iterator, skipping what aiokafka's own reader skips:
        control batches, aborted transactions under read_committed, and records before the
        position asked for (a compacted or compressed batch may begin earlier)."""
        records = self._records
        while records.has_next():
            batch = records.next_batch()
            if self._check_crcs and not _crc_valid(batch, self._records.last):
                raise CorruptRecordException(f"Invalid CRC - {self._tp}")
            if self._isolation_level == fetcher.READ_COMMITTED and batch.producer_id is not None:
                self._consume_aborted_up_to(batch.base_offset)
                if batch.is_control_batch and self._contains_abort_marker(batch):
                    self._aborted_producers.discard(batch.producer_id)
                if batch.is_transactional and batch.producer_id in self._aborted_producers:
                    self.next_fetch_offset = batch.next_offset
                    continue
            if batch.is_control_batch:
                self.next_fetch_offset = batch.next_offset
                continue
            start = self.next_fetch_offset
            try:
                taken = list(batch)
            except UnicodeDecodeError:  # a header name that is not UTF-8
                log.warning("header_name_not_utf8", partition=str(self._tp), at=batch.base_offset)
                taken = read_leniently(self._records.last)
            if taken and taken[0].offset < start:  # offsets ascend within a batch
                taken = [record for record in taken if record.offset >= start]
            if not taken:
                self.next_fetch_offset = batch.next_offset
                continue
            self.next_fetch_offset = start  # until the first of `taken` is handed over
            self._batch, self._left, self._after = taken, iter(taken), batch.next_offset
            yield self._left


def _crc_valid(batch: Any, raw: memoryview) -> bool:
    """A record batch's checksum checked by the CPU's CRC-32C instruction (aiokafka's reader
    looks each byte up in a table: ten times slower); older formats' as aiokafka checks it."""
    return crc_ok(raw) if raw[_MAGIC_AT] >= 2 else bool(batch.validate_crc())


def _partition_records(
    tp: Any, records: Fetched, aborted: Any, fetch_offset: int, key_deserializer: Any, *rest: Any
) -> Any:
    if key_deserializer is lean_records:
        return LeanPartitionRecords(tp, records, aborted, fetch_offset, key_deserializer, *rest)
    return _AIOKAFKA(tp, records.records, aborted, fetch_offset, key_deserializer, *rest)


def install() -> bool:
    """Have aiokafka's fetcher unpack lean records for consumers that ask (once per process);
    whether it does."""
    methods = ("_unpack_records", "_consume_aborted_up_to", "_contains_abort_marker")
    found = fetcher.PartitionRecords in (_AIOKAFKA, _partition_records)
    reader = default_records._DefaultRecordBatchPy
    if (
        not found
        or not all(hasattr(_AIOKAFKA, name) for name in methods)
        or not hasattr(reader, "_maybe_uncompress")
    ):
        log.warning("lean_records_unavailable", reason="aiokafka's fetcher is not as expected")
        return False
    fetcher.PartitionRecords = _partition_records
    fetcher.MemoryRecords = Fetched
    return True
