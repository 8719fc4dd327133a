"""The load generator behind `surge demo` and the benchmarks, on real Kafka and a real worker:
runs that share a long-lived reply topic each count their own results, once."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from surge.producers.load import run_load, shared_reply_topic
from tests.conftest import make_settings
from tests.helpers import create_topics

pytestmark = pytest.mark.integration

ROWS = np.random.default_rng(0).standard_normal((64, 1, 32)).astype(np.float32)


def _inputs(i: int) -> dict[str, np.ndarray]:
    return {"x": ROWS[i % len(ROWS)]}


async def test_runs_sharing_a_reply_topic_count_only_their_own_results(
    kafka: str, model_root: Path, run_worker: Callable[..., object]
) -> None:
    settings = make_settings(kafka, model_root, None)
    await run_worker(settings)  # type: ignore[misc]
    topic = settings.worker.topic_prefix + "mlp"
    replies = f"test.load.{uuid.uuid4().hex[:8]}"
    await create_topics(kafka, replies, partitions=2)
    load = {"topic": topic, "reply_topic": replies, "timeout_s": 60}

    first = await run_load(kafka, "mlp", _inputs, count=300, **load)
    # Two at once on the same topic: each reads the other's results too, and must skip them.
    burst, steady = await asyncio.gather(
        run_load(kafka, "mlp", _inputs, count=500, **load),
        run_load(kafka, "mlp", _inputs, count=200, rate=1000, **load),
    )

    for report, count in ((first, 300), (burst, 500), (steady, 200)):
        assert report.sent == count  # the untimed priming request is not one of them
        assert report.received == count
        assert report.statuses == {"ok": count}
        assert len(report.delivery_ms) == count
    assert steady.offered_rate == 1000
    assert 0.15 < steady.elapsed_s < 10  # 200 at 1,000/s: paced, not a burst


def test_a_shared_reply_topic_lives_as_long_as_its_block(kafka: str) -> None:
    async def topics() -> set[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
        await admin.start()
        try:
            return set(await admin.list_topics())
        finally:
            await admin.close()

    with shared_reply_topic(kafka) as name:
        assert name in asyncio.run(topics())
    deadline = time.monotonic() + 10  # deletion completes asynchronously on the broker
    while name in asyncio.run(topics()):
        assert time.monotonic() < deadline, f"{name} outlived its block"
        time.sleep(0.1)


async def test_a_reply_topic_that_does_not_exist_is_refused(
    kafka: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("surge.producers.load._METADATA_WAIT_S", 1.0)
    with pytest.raises(LookupError, match="does not exist"):
        await run_load(kafka, "mlp", _inputs, count=1, reply_topic=f"test.missing.{uuid.uuid4()}")


async def test_a_run_of_no_requests_returns_at_once(kafka: str) -> None:
    started = time.monotonic()
    report = await run_load(kafka, "mlp", _inputs, count=0, timeout_s=30)
    assert report.received == 0
    assert time.monotonic() - started < 15
