"""Kafka's default partitioner (murmur2 of the key, as the Java client computes it), for a
whole list of keys at once.

aiokafka computes murmur2 in pure Python, a few microseconds per key: as much as the rest of
a small request's reply path. Keys of equal length (request ids usually are) hash together
here as numpy columns, with uint32 arithmetic wrapping exactly as Java's int does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from aiokafka.partitioner import murmur2

# Up to this many keys, aiokafka's own murmur2 costs less than the numpy calls' overhead (light
# load: a few results per write).
_FEW = 8
_SEED = 0x9747B28C
_M = np.uint32(0x5BD1E995)


def key_partitions(keys: Sequence[bytes], partitions: Sequence[int]) -> list[int]:
    """The partition the default partitioner picks for each key, from `partitions` (sorted)."""
    if len(partitions) == 1:  # a client's reply topic, usually: nothing to hash
        return [partitions[0]] * len(keys)
    if len(keys) <= _FEW:
        return [partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)] for key in keys]
    lengths = list(map(len, keys))
    if min(lengths) == max(lengths):  # one length (request ids usually): one block
        data = np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), lengths[0])
        return np.asarray(partitions)[_murmur2(data, lengths[0]) % len(partitions)].tolist()
    chosen = np.empty(len(keys), np.int64)
    by_length: dict[int, list[int]] = {}
    for index, length in enumerate(lengths):
        by_length.setdefault(length, []).append(index)
    for length, rows in by_length.items():
        data = np.frombuffer(b"".join(keys[i] for i in rows), np.uint8).reshape(len(rows), length)
        chosen[rows] = _murmur2(data, length) % len(partitions)
    return np.asarray(partitions)[chosen].tolist()


def _murmur2(data: np.ndarray, length: int) -> np.ndarray:
    """murmur2 of each row of an (n, length) uint8 array, masked positive as Kafka does."""
    h = np.full(data.shape[0], _SEED ^ length, np.uint32)
    words = length // 4
    if words:
        columns = np.ascontiguousarray(data[:, : words * 4]).view("<u4")
        for column in range(words):
            k = columns[:, column] * _M
            k ^= k >> 24
            k *= _M
            h *= _M
            h ^= k
    tail, base = length % 4, words * 4
    if tail >= 3:
        h ^= data[:, base + 2].astype(np.uint32) << 16
    if tail >= 2:
        h ^= data[:, base + 1].astype(np.uint32) << 8
    if tail >= 1:
        h ^= data[:, base].astype(np.uint32)
        h *= _M
    h ^= h >> 13
    h *= _M
    h ^= h >> 15
    return (h & 0x7FFFFFFF).astype(np.int64)
