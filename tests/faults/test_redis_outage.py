"""Redis unavailable for ~10 s during a run with Redis replies: results are retried, offsets
are not committed past unwritten results, nothing is lost."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from surge.schemas.headers import REPLY_TO_REDIS
from tests.conftest import WorkerProcess, topic_of, worker_env
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
