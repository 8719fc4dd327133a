"""Results to Redis, on a real redis-server: many results per script call, the first result of
an id kept and announced once, and calls split by size."""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from redis.asyncio import Redis

from surge.workers.ledger import Ledger
from surge.workers.replies import Replies, _chunks_by_size


def _items(sizes: list[int]) -> list[tuple[Any, bytes]]:
    return [(SimpleNamespace(request_id=f"r{i}"), bytes(size)) for i, size in enumerate(sizes)]


def test_chunks_keep_order_and_stay_under_the_limit() -> None:
    items = _items([40, 40, 30, 100, 10, 10])
    chunks = list(_chunks_by_size(items, 100))
    assert [[t.request_id for t, _ in chunk] for chunk in chunks] == [
        ["r0", "r1"],
        ["r2"],
        ["r3"],  # over the limit alone: a call of its own
        ["r4", "r5"],
    ]


@pytest.mark.integration
async def test_a_call_of_many_results_keeps_the_first_of_each_id_and_announces_it_once(
    redis_url: str,
) -> None:
    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    redis = Redis.from_url(redis_url)
    replies = Replies(
        lambda _: None,
        redis,
        Ledger(10_000, 1 << 30),
        dead_letter_topic="unused",
        redis_ttl_s=60,
        redis_prefix=prefix,
        on_crash=lambda exc: None,
    )
    listener = Redis.from_url(redis_url)
    pubsub = listener.pubsub()
    await pubsub.psubscribe(prefix + "*")
    await pubsub.get_message(timeout=5)  # the confirmation
    try:
        first = [(SimpleNamespace(request_id=f"r{i}"), b"first-%d" % i) for i in range(700)]
        # A redelivered request's second result, for half of the ids.
        again = [(SimpleNamespace(request_id=f"r{i}"), b"again") for i in range(0, 700, 2)]
        await replies._write_redis(first)  # type: ignore[arg-type]
        await replies._write_redis(again)  # type: ignore[arg-type]

        stored = await redis.mget([f"{prefix}r{i}" for i in range(700)])
        assert stored == [b"first-%d" % i for i in range(700)]
        assert 55 <= await redis.ttl(f"{prefix}r0") <= 60
        announced: list[bytes] = []
        while (message := await pubsub.get_message(timeout=0.5)) is not None:
            if message["type"] == "pmessage":
                announced.append(message["data"])
        assert announced == [b"first-%d" % i for i in range(700)]
    finally:
        await pubsub.aclose()
        await asyncio.gather(listener.aclose(), redis.aclose())
