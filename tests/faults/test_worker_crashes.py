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
from tests.helpers import create_topics, publish, read_to_end, read_topic, wait_committed

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


async def test_repeated_sigkill_exactly_once_commits_one_result_each(
    kafka: str, model_root: Path, worker_processes: Callable[[dict[str, str]], WorkerProcess]
) -> None:
    count, kills = scaled(20_000), 10
    env = worker_env(
        kafka,
        model_root,
        None,
        SURGE_WORKER__DELIVERY="exactly_once",
        SURGE_WORKER__SESSION_TIMEOUT_MS="6000",
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
    rng = random.Random(4)
    for _ in range(kills):
        await asyncio.sleep(1.0)
        victim = rng.randrange(len(workers))
        workers[victim].kill()  # mid-transaction, as likely as not
        workers[victim] = worker_processes(env)
    await publishing
    clock = Stopwatch()
    await wait_committed(kafka, env["SURGE_WORKER__GROUP_ID"], topic, timeout=180)
    recovery = clock()
    results = await read_to_end(kafka, replies)  # read_committed, as every Surge reader
    lost, duplicated = tally(results, run, count)
    FaultReport(
        "worker SIGKILL, exactly-once",
        f"{kills} kills across 3 workers",
        count,
        lost,
        duplicated,
        recovery,
        "results counted with read_committed; killed workers' open transactions are aborted",
    ).save()
    assert (lost, duplicated) == (0, 0)


async def test_sigterm_under_load_then_restart_exactly_once(
    kafka: str, model_root: Path, worker_processes: Callable[[dict[str, str]], WorkerProcess]
) -> None:
    count = scaled(20_000)
    env = worker_env(kafka, model_root, None, SURGE_WORKER__DELIVERY="exactly_once")
    topic, run = topic_of(env, "mlp"), uuid.uuid4().hex[:8]
    replies = f"test.replies.{run}"
    await create_topics(kafka, topic, replies, partitions=6)
    workers = [worker_processes(env) for _ in range(2)]
    for worker in workers:
        worker.wait_for("worker_started")

    publishing = asyncio.create_task(
        publish(kafka, requests(topic, count, reply_to=replies, run=run), rate=count / 10)
    )
    await asyncio.sleep(3.0)
    clock = Stopwatch()
    assert await asyncio.to_thread(workers[0].terminate) == 0  # drains, commits, leaves
    stopped_in = clock()
    workers[0] = worker_processes(env)
    await publishing
    await wait_committed(kafka, env["SURGE_WORKER__GROUP_ID"], topic, timeout=120)
    results = await read_to_end(kafka, replies)
    lost, duplicated = tally(results, run, count)
    FaultReport(
        "worker SIGTERM + restart, exactly-once",
        "graceful stop under load, then a new worker",
        count,
        lost,
        duplicated,
        stopped_in,
        "recovery = time from SIGTERM to exit",
    ).save()
    assert (lost, duplicated) == (0, 0)
