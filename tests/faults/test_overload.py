"""A 10x burst queued against one worker: memory stays bounded (partitions pause when the
in-flight bound is reached) and the backlog drains. The backlog is written before the worker
starts: a worker that kept up with the writer would never reach the bound."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.conftest import WorkerProcess, topic_of, worker_env
from tests.faults.harness import FaultReport, Stopwatch, requests, scaled, tally
from tests.helpers import create_topics, publish, read_topic, wait_committed

pytestmark = pytest.mark.integration

IN_FLIGHT = 5_000
RSS_HEADROOM_MB = 200  # over the idle worker; the in-flight bound itself is ~10 MB


async def test_burst_keeps_memory_bounded_and_drains(
    kafka: str, model_root: Path, worker_processes: Callable[[dict[str, str]], WorkerProcess]
) -> None:
    count = scaled(200_000)
    env = worker_env(kafka, model_root, None, SURGE_WORKER__MAX_IN_FLIGHT=str(IN_FLIGHT))
    topic, run = topic_of(env, "mlp"), uuid.uuid4().hex[:8]
    replies = f"test.replies.{run}"
    await create_topics(kafka, topic, replies)
    idle = worker_processes(env)  # the same worker idle, for the memory baseline
    idle.wait_for("partitions_assigned")
    await asyncio.sleep(1)
    idle_mb = psutil.Process(idle.process.pid).memory_info().rss / 2**20
    assert await asyncio.to_thread(idle.terminate) == 0

    clock = Stopwatch()
    await publish(kafka, requests(topic, count, reply_to=replies, run=run))
    worker = worker_processes(env)
    process = psutil.Process(worker.process.pid)
    peak_mb = idle_mb

    async def sample() -> None:
        nonlocal peak_mb
        while True:
            with contextlib.suppress(psutil.NoSuchProcess):
                peak_mb = max(peak_mb, process.memory_info().rss / 2**20)
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    results = await read_topic(kafka, replies, until=count, timeout=300)
    drained = clock()
    sampler.cancel()
    lost, duplicated = tally(results, run, count)
    paused = sum(e.get("event") == "paused" for e in worker.events())
    FaultReport(
        "overload",
        f"{count:,} requests queued before the worker starts, max_in_flight {IN_FLIGHT:,}",
        count,
        lost,
        duplicated,
        drained,
        f"worker RSS idle {idle_mb:.0f} MB, peak {peak_mb:.0f} MB; paused {paused} times; "
        "recovery: publish start to last result",
    ).save()
    assert lost == 0
    assert peak_mb - idle_mb < RSS_HEADROOM_MB
    assert paused > 0, "the in-flight bound was never reached: the test did not overload"
    await wait_committed(kafka, env["SURGE_WORKER__GROUP_ID"], topic)
