"""Workers join and leave the group in the middle of batches: nothing is lost, no partition
is left stuck, and (with in-flight work finished and committed before partitions move) no
request is answered twice."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import WorkerProcess, topic_of, worker_env
from tests.faults.harness import FaultReport, Stopwatch, requests, scaled, tally
from tests.helpers import create_topics, publish, read_topic, wait_committed

pytestmark = pytest.mark.integration


async def test_joins_and_leaves_mid_batch(
    kafka: str, model_root: Path, worker_processes: Callable[[dict[str, str]], WorkerProcess]
) -> None:
    count = scaled(20_000)
    env = worker_env(kafka, model_root, None)
    topic, run = topic_of(env, "mlp"), uuid.uuid4().hex[:8]
    replies = f"test.replies.{run}"
    await create_topics(kafka, topic, replies, partitions=6)
    first = worker_processes(env)
    first.wait_for("partitions_assigned")

    publishing = asyncio.create_task(
        publish(kafka, requests(topic, count, reply_to=replies, run=run), rate=count / 10)
    )
    await asyncio.sleep(2)
    second = worker_processes(env)  # joins: partitions move away from the first
    await asyncio.sleep(2)
    third = worker_processes(env)  # joins again
    await asyncio.sleep(2)
    assert await asyncio.to_thread(first.terminate) == 0  # leaves: its partitions move on
    await asyncio.sleep(2)
    assert await asyncio.to_thread(second.terminate) == 0
    await publishing
    clock = Stopwatch()
    results = await read_topic(kafka, replies, until=count, timeout=120)
    recovery = clock()
    lost, duplicated = tally(results, run, count)
    FaultReport(
        "rebalance",
        "2 joins and 2 graceful leaves during the run",
        count,
        lost,
        duplicated,
        recovery,
        "recovery: end of publishing until every result is in",
    ).save()
    assert lost == 0
    assert duplicated == 0
    await wait_committed(kafka, env["SURGE_WORKER__GROUP_ID"], topic)
    assert third.process.poll() is None
