"""Kafka record batches (format v2) built whole from columns of alike records, and checksums.

aiokafka's batch builder takes one call per record: a keyword call, a pass over the record's
headers (each name encoded again) and a table-driven CRC-32C, about 1 µs per result here,
a tenth of a busy worker's CPU per request. A batch's results are alike: one length of key,
of body and of request id, and the same other headers. Such records differ only in those
bytes and in their offset delta, so a record batch of them is one join: each offset delta's
prefix and the bytes between the varying ones, made once per layout, around the records'
own keys, bodies and ids. Its CRC-32C is computed by the CPU's own instruction (`crc32c`,
ten times faster than aiokafka's table here).

Records that are not alike go through aiokafka's builder (`writes.send_batches`).
The bytes are those aiokafka's builder writes for the same records (a property test checks
it), and the producer sets its id, epoch and sequence on a built batch as on its own.
"""

from __future__ import annotations

import functools
import itertools
import struct
from collections.abc import Iterator, Sequence
from typing import Any

import crc32c
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.util import encode_varint, size_of_varint

_HEADER = struct.Struct(">qiiBIhiqqqhii")  # a record batch's fixed header, 61 bytes
_PRODUCER_STATE = struct.Struct(">qhi")  # producer id, epoch, base sequence
_PRODUCER_STATE_AT = 43
_CRC = struct.Struct(">I")
_CRC_AT = 17
_CRC_FROM = 21  # the checksum covers the attributes onwards
_TRANSACTIONAL = 0x10  # the attributes' transactional bit
# Offset deltas from here on take one more byte as varints.
_VARINT_STEPS = (64, 8192, 1 << 20, 1 << 27)


def crc_ok(batch: memoryview | bytes) -> bool:
    """Whether a record batch's CRC-32C matches its bytes (from its attributes on). Record
    batches only (magic 2): messages of the older formats have a CRC-32 elsewhere."""
    (stored,) = _CRC.unpack_from(batch, _CRC_AT)
    return stored == crc32c.crc32c(memoryview(batch)[_CRC_FROM:])


class BuiltBatch(BatchBuilder):  # type: ignore[misc]
    """A record batch built whole, handed to aiokafka's producer as its own builder is
    (`send_batch`). The producer sets its id, epoch and base sequence once it sends it,
    then takes the bytes: the checksum is written then."""

    def __init__(self, buffer: bytearray, count: int) -> None:  # its builder is not needed
        self._buffer = buffer
        self._count = count
        self._closed = True

    def append(self, **_: Any) -> None:
        return None  # full: it takes no more

    def _set_producer_state(self, producer_id: int, producer_epoch: int, sequence: int) -> None:
        _PRODUCER_STATE.pack_into(
            self._buffer, _PRODUCER_STATE_AT, producer_id, producer_epoch, sequence
        )

    def _build(self) -> bytearray:
        crc = crc32c.crc32c(memoryview(self._buffer)[_CRC_FROM:])
        _CRC.pack_into(self._buffer, _CRC_AT, crc)
        return self._buffer

    def size(self) -> int:
        return len(self._buffer)

    def record_count(self) -> int:
        return self._count


class Alike:
    """Records of one layout, as a batch's results are: a key, a body and a request id of
    one length each, and the same headers after the request id. `batches` cuts them into
    record batches."""

    def __init__(
        self,
        keys: Sequence[bytes],
        values: Sequence[bytes],
        id_header: str,
        ids: Sequence[bytes],
        common: Sequence[tuple[str, bytes | None]],
    ) -> None:
        self._columns = (keys, values, ids)
        headers = _headers(id_header, tuple(common))
        self._layout = _layout(len(keys[0]), len(values[0]), len(ids[0]), headers)

    def batches(
        self, batch_size: int, timestamp_ms: int, transactional: bool = False
    ) -> list[tuple[BuiltBatch, int, int]]:
        """Record batches of these records, in order, each with the range of records it
        holds: as many as fit in `batch_size` bytes, one at least."""
        layout, (keys, values, ids) = self._layout, self._columns
        attributes = _TRANSACTIONAL if transactional else 0
        built, start, count = [], 0, len(keys)
        while start < count:
            # As aiokafka's builder: a record goes in only if the batch stays under its size.
            taken = layout.fit(count - start, batch_size - _HEADER.size - 1)
            end = start + taken
            whole = start == 0 and end == count
            buffer = bytearray().join(
                itertools.chain(
                    (_NO_HEADER,),
                    layout.records(
                        keys if whole else keys[start:end],
                        values if whole else values[start:end],
                        ids if whole else ids[start:end],
                    ),
                )
            )
            _HEADER.pack_into(
                buffer, 0,
                0, len(buffer) - 12, -1, 2, 0, attributes, taken - 1,
                timestamp_ms, timestamp_ms, -1, -1, 0, taken,
            )  # fmt: skip
            built.append((BuiltBatch(buffer, taken), start, end))
            start = end
        return built


class _Layout:
    """The bytes alike records share: each record is its offset delta's prefix (its length,
    attributes, timestamp delta, offset delta and key length), its key, the value's length,
    its value, the headers up to the request id's value, that value, and the other headers."""

    def __init__(self, key: int, value: int, request_id: int, headers: tuple[bytes, bytes]) -> None:
        head, self._tail = headers
        self._key_length = _varint(key)
        self._value_length = _varint(value)
        self._head = head + _varint(request_id)
        # A record's bytes after its length varint, but its offset delta's.
        self._body = 2 + len(self._key_length) + key + len(self._value_length) + value
        self._body += len(self._head) + request_id + len(self._tail)
        self._prefixes: list[bytes] = []

    def fit(self, count: int, room: int) -> int:
        """How many of `count` records fit in `room` bytes of a record batch, one at least."""
        taken = 0
        for step in _VARINT_STEPS:  # records whose offset delta takes one byte more
            size = self._size(taken)
            can = min(step - taken, count - taken, room // size)
            taken += can
            room -= can * size
            if taken == count or taken < step:
                break
        return max(taken, 1)

    def records(
        self, keys: Sequence[bytes], values: Sequence[bytes], ids: Sequence[bytes]
    ) -> Iterator[bytes]:
        """The records' bytes, offset deltas from 0, as pieces to join."""
        count = len(keys)
        return itertools.chain.from_iterable(
            zip(
                self._prefix(count),
                keys,
                itertools.repeat(self._value_length, count),
                values,
                itertools.repeat(self._head, count),
                ids,
                itertools.repeat(self._tail, count),
                strict=True,
            )
        )

    def _size(self, delta: int) -> int:
        """A record's size, its length varint included, at this offset delta."""
        body = self._body + size_of_varint(delta)
        return size_of_varint(body) + body

    def _prefix(self, count: int) -> list[bytes]:
        """The prefixes of offset deltas 0 to `count`, made once per layout."""
        prefixes = self._prefixes
        for delta in range(len(prefixes), count):
            body = self._body + size_of_varint(delta)
            prefixes.append(_varint(body) + b"\0\0" + _varint(delta) + self._key_length)
        return prefixes if len(prefixes) == count else prefixes[:count]


_NO_HEADER = bytes(_HEADER.size)  # written once the records are in


@functools.lru_cache(maxsize=64)
def _headers(id_header: str, common: tuple[tuple[str, bytes | None], ...]) -> tuple[bytes, bytes]:
    """A record's headers around its request id's value: their count and the id's name, and
    the common headers."""
    name = id_header.encode()
    head = _varint(1 + len(common)) + _varint(len(name)) + name
    return head, b"".join(_header(key, value) for key, value in common)


@functools.lru_cache(maxsize=64)
def _layout(key: int, value: int, request_id: int, headers: tuple[bytes, bytes]) -> _Layout:
    return _Layout(key, value, request_id, headers)


def _header(name: str, value: bytes | None) -> bytes:
    raw = name.encode()
    if value is None:
        return _varint(len(raw)) + raw + _varint(-1)
    return _varint(len(raw)) + raw + _varint(len(value)) + value


def _varint(value: int) -> bytes:
    """Kafka's varint (zigzag, 7 bits a byte), as aiokafka writes it."""
    out = bytearray()
    encode_varint(value, out.append)
    return bytes(out)
