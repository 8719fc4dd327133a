"""Kafka's default partitioner (murmur2 of the key, as the Java client computes it), for a
whole list of keys at once.

aiokafka computes murmur2 a byte at a time in pure Python: 6-11 µs for a request id, more
than the rest of a small request's reply path. Here a key is read a 32-bit word at a time,
and keys of equal length (request ids usually are) hash together as numpy columns, with
uint32 arithmetic wrapping exactly as Java's int does.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

# Up to this many keys of one length, hashing them one by one costs less than the numpy
# calls' fixed overhead (light load: a few results per write).
_FEW = 6
_SEED = 0x9747B28C
_MUL = 0x5BD1E995
_M = np.uint32(_MUL)
_MASK = 0xFFFFFFFF


def key_partitions(keys: Sequence[bytes], partitions: Sequence[int]) -> list[int]:
    """The partition the default partitioner picks for each key, from `partitions` (sorted)."""
    count = len(partitions)
    if count == 1:  # a client's reply topic, usually: nothing to hash
        return [partitions[0]] * len(keys)
    if len(keys) <= _FEW:
        return [partitions[murmur2(key) % count] for key in keys]
    lengths = list(map(len, keys))
    if min(lengths) == max(lengths):  # one length (request ids usually): one block
        return np.asarray(partitions)[_murmur2_rows(keys, lengths[0]) % count].tolist()
    chosen = np.empty(len(keys), np.int64)
    by_length: dict[int, list[int]] = {}
    for index, length in enumerate(lengths):
        by_length.setdefault(length, []).append(index)
    for length, rows in by_length.items():
        if len(rows) <= _FEW:
            chosen[rows] = [murmur2(keys[i]) for i in rows]
        else:
            chosen[rows] = _murmur2_rows([keys[i] for i in rows], length)
    return np.asarray(partitions)[chosen % count].tolist()


def murmur2(key: bytes) -> int:
    """murmur2 of one key, masked positive as Kafka does."""
    length = len(key)
    h = _SEED ^ length
    words = length >> 2
    for k in struct.unpack_from(f"<{words}I", key):
        k = (k * _MUL) & _MASK
        k ^= k >> 24
        h = ((h * _MUL) & _MASK) ^ ((k * _MUL) & _MASK)
    base = words << 2
    tail = length - base
    if tail >= 3:
        h ^= key[base + 2] << 16
    if tail >= 2:
        h ^= key[base + 1] << 8
    if tail >= 1:
        h = ((h ^ key[base]) * _MUL) & _MASK
    h ^= h >> 13
    h = (h * _MUL) & _MASK
    h ^= h >> 15
    return h & 0x7FFFFFFF


def _murmur2_rows(keys: Sequence[bytes], length: int) -> np.ndarray:
    """murmur2 of each key (all `length` bytes long), masked positive as Kafka does."""
    data = np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), length)
    h = np.full(len(keys), _SEED ^ length, np.uint32)
    words = length >> 2
    if words:
        # Every word's mix at once; only the running hash goes word by word.
        k = np.ascontiguousarray(data[:, : words << 2]).view("<u4") * _M
        k ^= k >> 24
        k *= _M
        for column in np.ascontiguousarray(k.T):
            h *= _M
            h ^= column
    base = words << 2
    tail = length - base
    if tail >= 3:
        h ^= data[:, base + 2].astype(np.uint32) << 16
    if tail >= 2:
        h ^= data[:, base + 1].astype(np.uint32) << 8
    if tail >= 1:
        h ^= data[:, base]
        h *= _M
    h ^= h >> 13
    h *= _M
    h ^= h >> 15
    return (h & 0x7FFFFFFF).astype(np.int64)
