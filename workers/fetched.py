"""A fetch's records as its record batches hold them, handed over a batch at a time.

aiokafka makes a `ConsumerRecord` of every fetched record in Python: a generator step and two
calls per record, a fifth of a busy worker's event loop. A consumer made with
`key_deserializer=lean_records` gets instead the records that aiokafka's batch reader builds
in C (offset, timestamp, key, value, headers), unpacked a record batch at a time and handed
over by a C iterator. They carry no topic or partition: `getmany` gives those as the key of
their list. Every other consumer in the process gets its records as aiokafka makes them.

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

log = structlog.get_logger("surge.fetched")

_AIOKAFKA = fetcher.PartitionRecords


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
            if self._check_crcs and not batch.validate_crc():
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
            taken = list(batch)
            if taken and taken[0].offset < start:  # offsets ascend within a batch
                taken = [record for record in taken if record.offset >= start]
            if not taken:
                self.next_fetch_offset = batch.next_offset
                continue
            self.next_fetch_offset = start  # until the first of `taken` is handed over
            self._batch, self._left, self._after = taken, iter(taken), batch.next_offset
            yield self._left


def _partition_records(
    tp: Any, records: Any, aborted: Any, fetch_offset: int, key_deserializer: Any, *rest: Any
) -> Any:
    kind = LeanPartitionRecords if key_deserializer is lean_records else _AIOKAFKA
    return kind(tp, records, aborted, fetch_offset, key_deserializer, *rest)


def install() -> bool:
    """Have aiokafka's fetcher unpack lean records for consumers that ask (once per process);
    whether it does."""
    methods = ("_unpack_records", "_consume_aborted_up_to", "_contains_abort_marker")
    found = fetcher.PartitionRecords in (_AIOKAFKA, _partition_records)
    if not found or not all(hasattr(_AIOKAFKA, name) for name in methods):
        log.warning("lean_records_unavailable", reason="aiokafka's fetcher is not as expected")
        return False
    fetcher.PartitionRecords = _partition_records
    return True
