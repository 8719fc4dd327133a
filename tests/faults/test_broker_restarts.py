"""The Kafka broker hard-killed and restarted on the same log directory, then stopped
cleanly and restarted, during a run: nothing is lost, and workers reconnect by themselves."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import WorkerProcess, topic_of, worker_env
from tests.faults.harness import FaultReport, Stopwatch, requests, scaled, tally
from tests.helpers import create_topics, publish, read_topic
from tests.services import KafkaBroker

pytestmark = pytest.mark.integration


@pytest.fixture
def broker() -> Iterator[KafkaBroker]:
    """A broker of this test's own: the session's is shared and must stay up."""
    broker = KafkaBroker().start()
    yield broker
    broker.close()


@pytest.mark.parametrize("how", ["SIGKILL", "clean stop"])
async def test_broker_restart_loses_nothing(
    how: str,
    broker: KafkaBroker,
    model_root: Path,
    worker_processes: Callable[[dict[str, str]], WorkerProcess],
) -> None:
    count = scaled(10_000)
    env = worker_env(broker.bootstrap, model_root, None)
    topic, run = topic_of(env, "mlp"), uuid.uuid4().hex[:8]
    replies = f"test.replies.{run}"
    await create_topics(broker.bootstrap, topic, replies)
    workers = [worker_processes(env) for _ in range(2)]
    for worker in workers:
        worker.wait_for("partitions_assigned")

    publishing = asyncio.create_task(
        publish(broker.bootstrap, requests(topic, count, reply_to=replies, run=run), rate=count / 8)
    )
    await asyncio.sleep(2.5)
    await asyncio.to_thread(broker.kill if how == "SIGKILL" else broker.stop)
    await asyncio.sleep(3)
    clock = Stopwatch()
    await asyncio.to_thread(broker.start)
    await publishing
    results = await read_topic(broker.bootstrap, replies, until=count, timeout=180)
    recovery = clock()
    lost, duplicated = tally(results, run, count)
    FaultReport(
        f"broker {how}",
        "broker down ~3 s mid-run, restarted on its log dir",
        count,
        lost,
        duplicated,
        recovery,
        "recovery: broker restart until every result is in",
    ).save()
    assert lost == 0
    assert all(w.process.poll() is None for w in workers), "workers reconnect, they don't exit"
