"""A model slower than the consumer's poll interval: model calls run in executor threads, so
the worker keeps polling, stays in the group (no rebalance storm) and results arrive."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from surge.producers import request_body, request_headers
from surge.schemas import MSGPACK, headers
from tests.conftest import WorkerProcess, topic_of, worker_env
from tests.faults.harness import FaultReport, Stopwatch, tally
from tests.helpers import create_topics, publish, read_topic
from tests.models import write_hangs, write_slow

pytestmark = pytest.mark.integration


async def _serving(
    kafka: str,
    model_root: Path,
    worker_processes: Callable[[dict[str, str]], WorkerProcess],
    model: str,
    **settings: str,
) -> tuple[WorkerProcess, str, str, str]:
    """A `surge worker` process serving `model`, assigned its partitions: (the process, the
    request topic, a run id, a reply topic of the run's own)."""
    env = worker_env(kafka, model_root, None, **settings)
    topic, run = topic_of(env, model), uuid.uuid4().hex[:8]
    replies = f"test.replies.{run}"
    await create_topics(kafka, topic, replies)
    worker = worker_processes(env)
    worker.wait_for("partitions_assigned", timeout=120)
    return worker, topic, run, replies


async def test_model_slower_than_max_poll_interval(
    kafka: str, model_root: Path, worker_processes: Callable[[dict[str, str]], WorkerProcess]
) -> None:
    write_slow(model_root)
    worker, topic, run, replies = await _serving(
        kafka,
        model_root,
        worker_processes,
        "slow",
        SURGE_WORKER__MAX_POLL_INTERVAL_MS="1000",
        SURGE_WORKER__SESSION_TIMEOUT_MS="6000",
    )
    assignments = sum(e.get("event") == "partitions_assigned" for e in worker.events())

    count = 6  # several model calls of 1-2 s each, every one longer than the poll interval
    records = []
    for i in range(count):
        request_id = f"{run}-{i}"
        body = request_body({"x": np.full((1, 4), i, np.float32)}, request_id, MSGPACK)
        route = request_headers(model="slow", content_type=MSGPACK, reply_to=replies)
        records.append((topic, request_id.encode(), body, route))
    clock = Stopwatch()
    for start in range(0, count, 3):  # spread out: one batch after another
        await publish(kafka, records[start : start + 3])
        await read_topic(kafka, replies, until=start + 3, timeout=60)
    results = await read_topic(kafka, replies, until=count, timeout=60)
    lost, duplicated = tally(results, run, count)
    rebalances = sum(e.get("event") == "partitions_assigned" for e in worker.events()) - assignments
    FaultReport(
        "slow model",
        "1-2 s per model call, max.poll.interval 1 s",
        count,
        lost,
        duplicated,
        clock(),
        f"{rebalances} rebalances while serving",
    ).save()
    assert lost == 0
    assert rebalances == 0
    assert all(r.headers[headers.STATUS] == b"ok" for v in results.values() for r in v)


async def test_a_hung_model_call_is_answered_timeout_and_its_worker_restarts(
    kafka: str, model_root: Path, worker_processes: Callable[[dict[str, str]], WorkerProcess]
) -> None:
    write_hangs(model_root)
    worker, topic, run, replies = await _serving(
        kafka,
        model_root,
        worker_processes,
        "hangs",
        SURGE_WORKER__BATCH_TIME_BUDGET_S="1",
        SURGE_WORKER__SHUTDOWN_TIMEOUT_S="5",
    )

    body = request_body({"x": np.full((1, 4), 13, np.float32)}, run, MSGPACK)
    route = request_headers(model="hangs", content_type=MSGPACK, reply_to=replies)
    await publish(kafka, [(topic, run.encode(), body, route)])
    (reply,) = (await read_topic(kafka, replies, until=1, timeout=60))[run]
    assert reply.headers[headers.ERROR_CODE] == b"timeout"
    # Its thread cannot be interrupted: the worker exits (for its supervisor to restart it)
    # rather than answer `timeout` to every later request of the model, or hang at exit.
    assert await asyncio.to_thread(worker.process.wait, 60) == 1
