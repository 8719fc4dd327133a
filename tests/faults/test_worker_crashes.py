"""Workers SIGKILLed in the middle of batches, again and again: at-least-once holds."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import WorkerProcess, topic_of, worker_env
from tests.faults.harness import FaultReport, Stopwatch, requests, scaled, tally
from tests.helpers import create_topics, publish, read_topic, wait_committed

pytestmark = pytest.mark.integration


async def test_repeated_sigkill_loses_nothing(
    kafka: str, model_root: Path, worker_processes: Callable[[dict[str, str]], WorkerProcess]
) -> None:
    count, kills = scaled(20_000), 10
    env = worker_env(
        kafka,
        model_root,
        None,
        SURGE_WORKER__SESSION_TIMEOUT_MS="6000",  # the broker's minimum: crashed members go fast
        SURGE_WORKER__MAX_IN_FLIGHT="2000",
    )
    topic, run = topic_of(env, "mlp"), uuid.uuid4().hex[:8]
    replies = f"test.replies.{run}"
    await create_topics(kafka, topic, replies, partitions=6)
    workers = [worker_processes(env) for _ in range(3)]
    for worker in workers:
        worker.wait_for("worker_started")

    publishing = asyncio.create_task(
        publish(kafka, requests(topic, count, reply_to=replies, run=run), rate=count / 12)
    )
    rng = random.Random(3)
    for _ in range(kills):
        await asyncio.sleep(1.0)
        victim = rng.randrange(len(workers))
        workers[victim].kill()  # SIGKILL: no drain, no commit, no LeaveGroup
        workers[victim] = worker_processes(env)
    await publishing
    clock = Stopwatch()
    results = await read_topic(kafka, replies, until=count, timeout=180)
    recovery = clock()
    lost, duplicated = tally(results, run, count)
    FaultReport(
        "worker SIGKILL",
        f"{kills} kills across 3 workers",
        count,
        lost,
        duplicated,
        recovery,
        "at-least-once: duplicates are the uncommitted tail of each killed worker",
    ).save()
    assert lost == 0
    await wait_committed(kafka, env["SURGE_WORKER__GROUP_ID"], topic, timeout=60)
