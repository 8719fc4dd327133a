"""Redis unavailable for ~10 s during a run with Redis replies: results are retried, offsets
are not committed past unwritten results, nothing is lost."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from surge.config import Settings
from surge.producers import SurgeClient
from surge.schemas.headers import REPLY_TO_REDIS
from surge.workers import Worker
from tests.conftest import WorkerProcess, make_settings, topic_of, worker_env
from tests.faults.harness import FaultReport, Stopwatch, requests, scaled
from tests.helpers import committed_lag, create_topics, publish, read_redis, wait_committed
from tests.services import RedisServer

pytestmark = pytest.mark.integration

OUTAGE_S = 10


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer(persistent=True).start()  # as production Redis: a restart keeps data
    yield server
    server.close()


async def test_redis_outage_loses_nothing(
    kafka: str,
    redis: RedisServer,
    model_root: Path,
    worker_processes: Callable[[dict[str, str]], WorkerProcess],
) -> None:
    count = scaled(8_000)
    env = worker_env(kafka, model_root, redis.url, SURGE_REDIS__SOCKET_TIMEOUT_S="1")
    topic, run, group = topic_of(env, "mlp"), uuid.uuid4().hex[:8], env["SURGE_WORKER__GROUP_ID"]
    await create_topics(kafka, topic)
    worker = worker_processes(env)
    worker.wait_for("partitions_assigned")

    stream = list(requests(topic, count, reply_to=REPLY_TO_REDIS, run=run))
    await publish(kafka, stream[: count // 4])
    await asyncio.to_thread(redis.stop)
    await publish(kafka, stream[count // 4 :])  # all of it arrives while Redis is down
    await asyncio.sleep(OUTAGE_S / 2)
    held_back = await committed_lag(kafka, group, topic)
    await asyncio.sleep(OUTAGE_S / 2)
    clock = Stopwatch()
    await asyncio.to_thread(redis.start)
    found = await read_redis(redis.url, [f"{run}-{i}" for i in range(count)], timeout=120)
    recovery = clock()
    lost = count - len(found)
    FaultReport(
        "Redis outage",
        f"redis-server stopped {OUTAGE_S} s mid-run",
        count,
        lost,
        0,
        recovery,
        f"{held_back} offsets held back uncommitted during the outage; SET NX hides duplicates",
    ).save()
    assert lost == 0
    assert held_back > 0, "offsets were committed past results Redis had not taken"
    await wait_committed(kafka, group, topic)
    assert worker.process.poll() is None


async def test_client_recovers_after_a_redis_outage(
    kafka: str,
    redis: RedisServer,
    model_root: Path,
    run_worker: Callable[[Settings], Worker],
) -> None:
    worker = await run_worker(make_settings(kafka, model_root, redis.url))
    x = {"x": np.ones((1, 32), np.float32)}
    async with SurgeClient(
        kafka, topic_prefix=worker.settings.worker.topic_prefix, redis_url=redis.url
    ) as client:
        await client.predict("mlp", x, via="redis", timeout=20)
        await asyncio.to_thread(redis.stop)
        await asyncio.sleep(2)
        await asyncio.to_thread(redis.start)
        await asyncio.sleep(1)
        result = await client.predict("mlp", x, via="redis", timeout=20)
    assert result.outputs["probs"].shape == (1, 10)
