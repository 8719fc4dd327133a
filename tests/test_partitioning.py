"""Reply partitions: the same as Kafka's default partitioner (aiokafka's), for any keys."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given
from hypothesis import strategies as st

from surge.workers.partitioning import key_partitions


@given(
    st.lists(st.binary(min_size=0, max_size=40), min_size=1, max_size=50),
    st.integers(min_value=1, max_value=64),
)
def test_key_partitions_agree_with_the_default_partitioner(keys: list[bytes], count: int) -> None:
    partitions = list(range(count))
    expected = [DefaultPartitioner()(key, partitions, partitions) for key in keys]
    assert key_partitions(keys, partitions) == expected


def test_request_ids_of_one_length_hash_together() -> None:
    keys = [f"req-{i:06d}".encode() for i in range(1000)]
    partitions = [0, 1, 2, 3, 4, 5, 6, 7]
    expected = [DefaultPartitioner()(key, partitions, partitions) for key in keys]
    assert key_partitions(keys, partitions) == expected


@given(st.lists(st.binary(min_size=0, max_size=12), min_size=1, max_size=8))
def test_one_key_hashes_as_the_default_partitioner_does(keys: list[bytes]) -> None:
    partitions = list(range(7))
    expected = [DefaultPartitioner()(key, partitions, partitions) for key in keys]
    assert [key_partitions([key], partitions)[0] for key in keys] == expected


def test_keys_of_mixed_lengths_hash_by_length_in_blocks_and_one_by_one() -> None:
    keys = [f"r-{i}".encode() for i in range(200)] + [b"x" * 9, b"y" * 33, b"", b"z" * 33]
    partitions = list(range(12))
    expected = [DefaultPartitioner()(key, partitions, partitions) for key in keys]
    assert key_partitions(keys, partitions) == expected
