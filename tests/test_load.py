"""The load generator behind `surge demo` and the benchmarks, on real Kafka and a real worker:
runs that share a long-lived reply topic each count their own results, once; requests go out
as they fall due or as a producer's linger holds them, timed from when they were due."""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from surge.producers import load as load_module
from surge.producers.load import run_load, shared_reply_topic
from tests.conftest import make_settings
from tests.helpers import create_topics, read_to_end

pytestmark = pytest.mark.integration

ROWS = np.random.default_rng(0).standard_normal((64, 1, 32)).astype(np.float32)


def _inputs(i: int) -> dict[str, np.ndarray]:
    return {"x": ROWS[i % len(ROWS)]}


async def _served(
    kafka: str, model_root: Path, run_worker: Callable[..., object], *, reply_partitions: int
) -> tuple[str, str]:
    """A worker serving the MLP: its request topic, and a new reply topic."""
    settings = make_settings(kafka, model_root, None)
    await run_worker(settings)  # type: ignore[misc]
    replies = f"test.load.{uuid.uuid4().hex[:8]}"
    await create_topics(kafka, replies, partitions=reply_partitions)
    return settings.worker.topic_prefix + "mlp", replies


async def test_runs_sharing_a_reply_topic_count_only_their_own_results(
    kafka: str, model_root: Path, run_worker: Callable[..., object]
) -> None:
    topic, replies = await _served(kafka, model_root, run_worker, reply_partitions=2)
    load = {"topic": topic, "reply_topic": replies, "timeout_s": 60}

    collecting: list[bool] = []
    first = await run_load(
        kafka,
        "mlp",
        _inputs,
        count=300,
        on_first_send=lambda: collecting.append(gc.isenabled()),
        **load,
    )
    # No cyclic collection while timing; the process's own setting is back afterwards.
    assert collecting == [False]
    assert gc.isenabled()
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


def test_runs_timed_at_once_give_the_collector_back_when_the_last_ends() -> None:
    assert gc.isenabled()
    load_module._pause_gc()
    load_module._pause_gc()
    load_module._resume_gc()
    assert not gc.isenabled()  # the other run is still timing
    load_module._resume_gc()
    assert gc.isenabled()

    gc.disable()  # a caller that runs without the collector keeps it off
    try:
        load_module._pause_gc()
        load_module._resume_gc()
        assert not gc.isenabled()
    finally:
        gc.enable()


async def test_a_lingering_run_sends_due_requests_together_and_times_them_from_due(
    kafka: str, model_root: Path, run_worker: Callable[..., object]
) -> None:
    topic, replies = await _served(kafka, model_root, run_worker, reply_partitions=1)
    load = {"topic": topic, "reply_topic": replies, "timeout_s": 60, "count": 100, "rate": 100}

    first = time.time() * 1000
    at_once = await run_load(kafka, "mlp", _inputs, **load)
    second = time.time() * 1000
    lingering = await run_load(kafka, "mlp", _inputs, linger_ms=300, **load)

    assert at_once.received == lingering.received == 100
    # Each send's records are stamped as they are appended, within a millisecond. Over 1 s,
    # a request every 10 ms goes out alone; with a 300 ms linger, a send carries those due in
    # the last 300 ms (and the untimed first request goes alone).
    stamps = await _create_times(kafka, topic)
    assert len({t for t in stamps if first <= t < second}) > 80
    assert len({t for t in stamps if t >= second}) < 12
    # Requests wait 0-300 ms for their send, 150 on average, and their latency counts it.
    assert lingering.percentile(50) > 100


async def _create_times(kafka: str, topic: str) -> list[int]:
    """The create time (ms) of every record on `topic`."""
    by_key = await read_to_end(kafka, topic, key_of=None)
    return [record.timestamp for records in by_key.values() for record in records]


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


@pytest.mark.parametrize("rate", [0.0, -5.0, float("nan"), float("inf")])
async def test_a_rate_that_is_no_positive_number_is_refused(kafka: str, rate: float) -> None:
    """0 would divide by zero; a negative rate would send the first request for ever."""
    with pytest.raises(ValueError, match="rate must be a positive number"):
        await run_load(kafka, "mlp", _inputs, count=3, rate=rate)
