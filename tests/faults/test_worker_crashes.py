"""Workers SIGKILLed in the middle of batches, again and again, and stopped under load:
nothing is lost; in exactly-once mode nothing is doubled either."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import WorkerProcess, topic_of, worker_env
from tests.faults.harness import FaultReport, Stopwatch, requests, scaled, tally
from tests.helpers import create_topics, publish, read_to_end, wait_committed

pytestmark = pytest.mark.integration


@dataclass
class _Run:
    """Workers serving a topic while requests are published to it at a steady rate."""

    env: dict[str, str]
    topic: str
    replies: str
    run: str
    count: int
    workers: list[WorkerProcess]
    publishing: asyncio.Task[None]

    async def outcome(self, kafka: str, timeout: float) -> tuple[int, int]:
        """(lost, duplicated), once every request's offset is committed."""
        await wait_committed(kafka, self.env["SURGE_WORKER__GROUP_ID"], self.topic, timeout)
        return tally(await read_to_end(kafka, self.replies), self.run, self.count)


async def _start(
    kafka: str,
    env: dict[str, str],
    start_worker: Callable[[dict[str, str]], WorkerProcess],
    *,
    workers: int,
    count: int,
    seconds: float,
) -> _Run:
    topic, run = topic_of(env, "mlp"), uuid.uuid4().hex[:8]
    replies = f"test.replies.{run}"
    await create_topics(kafka, topic, replies, partitions=6)
    processes = [start_worker(env) for _ in range(workers)]
    for process in processes:
        process.wait_for("worker_started")
    records = requests(topic, count, reply_to=replies, run=run)
    publishing = asyncio.create_task(publish(kafka, records, rate=count / seconds))
    return _Run(env, topic, replies, run, count, processes, publishing)


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
async def test_repeated_sigkill(
    kafka: str,
    model_root: Path,
    worker_processes: Callable[[dict[str, str]], WorkerProcess],
    delivery: str,
) -> None:
    """At-least-once: every id has a result. Exactly-once: every id has exactly one
    committed result (read with read_committed, as every Surge reader)."""
    count, kills = scaled(20_000), 10
    env = worker_env(
        kafka,
        model_root,
        None,
        SURGE_WORKER__DELIVERY=delivery,
        SURGE_WORKER__SESSION_TIMEOUT_MS="6000",  # the broker's minimum: crashed members go fast
        SURGE_WORKER__MAX_IN_FLIGHT="2000",
    )
    started = await _start(kafka, env, worker_processes, workers=3, count=count, seconds=12)
    workers = started.workers
    rng = random.Random(3)
    for _ in range(kills):
        await asyncio.sleep(1.0)
        victim = rng.randrange(len(workers))
        workers[victim].kill()  # SIGKILL: no drain, no commit, no LeaveGroup; mid-transaction
        workers[victim] = worker_processes(env)
    await started.publishing
    clock = Stopwatch()
    lost, duplicated = await started.outcome(kafka, timeout=180)
    recovery = clock()
    exactly_once = delivery == "exactly_once"
    FaultReport(
        "worker SIGKILL, exactly-once" if exactly_once else "worker SIGKILL",
        f"{kills} kills across 3 workers",
        count,
        lost,
        duplicated,
        recovery,
        "killed workers' open transactions are aborted"
        if exactly_once
        else "at-least-once: duplicates are the uncommitted tail of each killed worker",
    ).save()
    assert lost == 0
    if exactly_once:
        assert duplicated == 0


async def test_sigterm_under_load_then_restart_exactly_once(
    kafka: str, model_root: Path, worker_processes: Callable[[dict[str, str]], WorkerProcess]
) -> None:
    count = scaled(20_000)
    env = worker_env(kafka, model_root, None, SURGE_WORKER__DELIVERY="exactly_once")
    started = await _start(kafka, env, worker_processes, workers=2, count=count, seconds=10)
    await asyncio.sleep(3.0)
    clock = Stopwatch()
    assert await asyncio.to_thread(started.workers[0].terminate) == 0  # drains, commits, leaves
    stopped_in = clock()
    started.workers[0] = worker_processes(env)
    await started.publishing
    lost, duplicated = await started.outcome(kafka, timeout=120)
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
