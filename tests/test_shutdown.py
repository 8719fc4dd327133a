"""SIGTERM under load: stop fetching, finish in-flight batches, publish, commit, leave the
group; a successor resumes where it stopped, losing nothing and repeating nothing."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from structlog.testing import capture_logs

from surge.producers import SurgeClient, request_body, request_headers
from surge.schemas import MSGPACK, headers
from surge.workers import Worker, repository
from tests.conftest import WorkerProcess, make_settings, topic_of, worker_env
from tests.helpers import create_topics, publish, read_topic, wait_committed
from tests.models import write_hangs, write_slow

pytestmark = pytest.mark.integration

COUNT = 6_000


async def test_sigterm_mid_load_loses_and_repeats_nothing(
    kafka: str, model_root: Path, worker_processes: Callable[[dict[str, str]], WorkerProcess]
) -> None:
    env = worker_env(kafka, model_root, None)
    group = env["SURGE_WORKER__GROUP_ID"]
    topic = topic_of(env, "mlp")
    await create_topics(kafka, topic)
    reply_topic = f"test.replies.{uuid.uuid4().hex[:8]}"
    await create_topics(kafka, reply_topic, partitions=1)
    first = worker_processes(env)
    first.wait_for("partitions_assigned")

    x = {"x": np.ones((1, 32), np.float32)}
    route = request_headers(model="mlp", content_type=MSGPACK, reply_to=reply_topic)
    records = [
        (topic, str(i).encode(), request_body(x, str(i), MSGPACK), route) for i in range(COUNT)
    ]
    publishing = asyncio.create_task(publish(kafka, records, rate=4000))
    await asyncio.sleep(0.8)  # mid-stream: some served, some queued, some in flight
    assert await asyncio.to_thread(first.terminate) == 0
    [stopped] = [e for e in first.events() if e.get("event") == "worker_stopped"]
    # Where the stop spent its time, step by step, for an operator sizing the grace period.
    steps = ["drain", "commit", "leave_group", "replies", "writes", "producer"]
    assert list(stopped["steps_s"]) == steps
    assert all(0 <= seconds < 10 for seconds in stopped["steps_s"].values())
    await publishing

    second = worker_processes(env)
    results = await read_topic(kafka, reply_topic, until=COUNT, timeout=60)
    assert len(results) == COUNT, f"{COUNT - len(results)} requests lost"
    duplicates = {k: len(v) for k, v in results.items() if len(v) > 1}
    assert not duplicates, f"{len(duplicates)} requests answered twice"
    assert all(r.headers[headers.STATUS] == b"ok" for v in results.values() for r in v)
    await wait_committed(kafka, group, topic)
    assert second.terminate() == 0


async def test_a_stop_while_the_subscription_changes_commits_what_was_answered(
    kafka: str, model_root: Path
) -> None:
    config = model_root / "mlp" / "config.toml"
    slow = config.read_text().replace("max_batch_delay_ms = 2.0", "max_batch_delay_ms = 3000")
    config.write_text(slow)  # requests wait in the queue for a batch
    settings = make_settings(kafka, model_root, None)
    topic, group = settings.worker.topic_prefix + "mlp", settings.worker.group_id
    reply_topic = f"test.replies.{uuid.uuid4().hex[:8]}"
    await create_topics(kafka, topic, reply_topic)
    worker = Worker(settings)
    running = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.ready.wait(), 60)

    x = {"x": np.ones((1, 32), np.float32)}
    route = request_headers(model="mlp", content_type=MSGPACK, reply_to=reply_topic)
    await publish(
        kafka, [(topic, b"%d" % i, request_body(x, str(i), MSGPACK), route) for i in range(20)]
    )
    async with asyncio.timeout(30):
        while worker._ledger.records < 20:  # taken in, waiting for their batch
            await asyncio.sleep(0.05)
    shutil.copytree(model_root / "mlp", model_root / "other")  # a new topic: resubscribe
    async with asyncio.timeout(30):
        while not worker._held:  # the old assignment drains before the new subscription
            await asyncio.sleep(0.01)
    worker.stop()
    await asyncio.wait_for(running, 60)

    assert len(await read_topic(kafka, reply_topic, until=20)) == 20
    await wait_committed(kafka, group, topic, timeout=5)  # nothing answered twice by a successor


async def test_a_model_call_still_running_at_shutdown_does_not_keep_the_process(
    kafka: str, tmp_path: Path, worker_processes: Callable[[dict[str, str]], WorkerProcess]
) -> None:
    """Python waits for executor threads at exit, as long as their calls take: a worker whose
    shutdown ran out of time with a call still running exits without it, with status 1 (its
    request is redelivered to the next owner), instead of staying up for hours."""
    root = tmp_path / "models"
    write_hangs(root)
    env = worker_env(
        kafka,
        root,
        None,
        SURGE_WORKER__SHUTDOWN_TIMEOUT_S="2",
        SURGE_WORKER__BATCH_TIME_BUDGET_S="600",  # not taken for hung: shutdown decides
    )
    topic = topic_of(env, "hangs")
    await create_topics(kafka, topic)
    worker = worker_processes(env)
    worker.wait_for("partitions_assigned")
    stuck = np.full((1, 4), 13, np.float32)  # hours of CPU for this model
    route = request_headers(model="hangs", content_type=MSGPACK, reply_to="test.replies.none")
    await publish(kafka, [(topic, b"r", request_body({"x": stuck}, "r", MSGPACK), route)])
    await asyncio.sleep(3)  # taken in, its call running
    started = asyncio.get_running_loop().time()
    assert await asyncio.to_thread(worker.terminate, 60) == 1
    assert asyncio.get_running_loop().time() - started < 30
    assert any(e.get("event") == "model_calls_outlived_shutdown" for e in worker.events())


async def test_a_model_that_hangs_on_the_event_loop_ends_the_process(
    kafka: str, tmp_path: Path, worker_processes: Callable[[dict[str, str]], WorkerProcess]
) -> None:
    """A model proven fast runs on the event loop, which cannot time out a call it is blocked
    in: a call still running two budgets on ends the process (status 1), for a restart that
    runs the model on a thread again, rather than leave the worker frozen out of its group."""
    root = tmp_path / "models"
    write_hangs(root)
    config = root / "hangs" / "config.toml"  # fast enough even on a busy machine
    config.write_text("inline_below_ms = 10\n" + config.read_text())
    env = worker_env(kafka, root, None, SURGE_WORKER__BATCH_TIME_BUDGET_S="2")
    topic = topic_of(env, "hangs")
    await create_topics(kafka, topic)
    worker = worker_processes(env)
    worker.wait_for("partitions_assigned")
    route = request_headers(model="hangs", content_type=MSGPACK, reply_to="test.replies.none")
    body = request_body({"x": np.ones((1, 4), np.float32)}, "quick", MSGPACK)
    deadline = asyncio.get_running_loop().time() + 60
    # One batch each: the model proves fast and moves onto the loop.
    while not any(e.get("event") == "model_inline" for e in worker.events()):
        assert asyncio.get_running_loop().time() < deadline, "never ran on the loop"
        await publish(kafka, [(topic, b"quick", body, route)])
        await asyncio.sleep(0.05)
    stuck = np.full((1, 4), 13, np.float32)  # hours of CPU for this model
    await publish(kafka, [(topic, b"r", request_body({"x": stuck}, "r", MSGPACK), route)])
    assert await asyncio.to_thread(worker.process.wait, 30) == 1
    hung = [e for e in worker.events() if e.get("event") == "model_hung"]
    assert [e["on_event_loop"] for e in hung] == [True]


async def test_a_worker_without_models_stops_at_once(
    kafka: str, tmp_path: Path, worker_processes: Callable[[dict[str, str]], WorkerProcess]
) -> None:
    (tmp_path / "empty").mkdir()
    env = worker_env(kafka, tmp_path / "empty", None, SURGE_WORKER__RELOAD_INTERVAL_S="60")
    worker = worker_processes(env)
    worker.wait_for("no_models")
    started = asyncio.get_running_loop().time()
    assert await asyncio.to_thread(worker.terminate, 60) == 0
    assert asyncio.get_running_loop().time() - started < 15, "waited out the reload interval"


async def test_a_worker_stopped_while_its_models_load_joins_no_group(
    kafka: str, tmp_path: Path, worker_processes: Callable[[dict[str, str]], WorkerProcess]
) -> None:
    """Joining only to leave again would cost every other member of the group two rebalances;
    and the stop does not wait for the loads to end."""
    root = tmp_path / "models"
    write_slow(root)  # one to two seconds a call: seven warm-up sizes take 7-14 s
    config = root / "slow" / "config.toml"
    config.write_text("preferred_batch_sizes = [2, 4, 8, 16, 32]\n" + config.read_text())
    env = worker_env(kafka, root, None)
    topic = topic_of(env, "slow")
    await create_topics(kafka, topic)
    rebalances: list[set[TopicPartition]] = []

    class Counting(ConsumerRebalanceListener):  # type: ignore[misc]
        async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
            rebalances.append(revoked)

        async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
            pass

    member = AIOKafkaConsumer(bootstrap_servers=kafka, group_id=env["SURGE_WORKER__GROUP_ID"])
    await member.start()
    member.subscribe([topic], listener=Counting())
    try:
        while not member.assignment():
            await member.getmany(timeout_ms=200)
        rebalances.clear()
        worker = worker_processes(env)
        await asyncio.to_thread(worker.wait_for, "model_loading")
        started = time.monotonic()
        assert await asyncio.to_thread(worker.terminate, 120) == 0
        assert time.monotonic() - started < 5, "waited for the loads"
        assert "worker_stopped" in [e.get("event") for e in worker.events()]
        for _ in range(40):  # heartbeats would bring a rebalance by now
            await member.getmany(timeout_ms=200)
        assert rebalances == []
    finally:
        await member.stop()


class _HungScans:
    """`repository.scan` as on a network mount that stopped answering: from the `after`-th
    call on, each blocks until released (a stat on such a mount never returns)."""

    def __init__(self, after: int) -> None:
        self.calls = 0
        self.after = after
        self.stuck = threading.Event()
        self.released = threading.Event()
        self._scan = repository.scan

    def __call__(self, *args: object) -> repository.Scan:
        self.calls += 1
        if self.calls >= self.after:
            self.stuck.set()
            self.released.wait()
        return self._scan(*args)  # type: ignore[arg-type]


@pytest.fixture
def hung_scans(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], _HungScans]:
    made: list[_HungScans] = []

    def make(after: int) -> _HungScans:
        made.append(_HungScans(after))
        monkeypatch.setattr(repository, "scan", made[-1])
        return made[-1]

    yield make
    for scans in made:  # the test process must not wait for them at exit
        scans.released.set()


async def test_a_scan_hung_on_the_model_root_is_said_and_keeps_no_stop_waiting(
    kafka: str,
    model_root: Path,
    hung_scans: Callable[[int], _HungScans],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hot-reload scan that never returns (the model root on a mount that stopped
    answering) leaves the models loaded serving, is logged once it has taken SCAN_SLOW_S,
    and does not hold a stop: the process exits without its thread (`threads_left`)."""
    monkeypatch.setattr(repository, "SCAN_SLOW_S", 0.5)
    scans = hung_scans(2)  # the start-up scan reads the root; the first reload hangs
    settings = make_settings(kafka, model_root, None, SURGE_WORKER__RELOAD_INTERVAL_S="0.2")
    topic = settings.worker.topic_prefix + "mlp"
    await create_topics(kafka, topic)
    worker = Worker(settings)
    with capture_logs() as logs:
        running = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.ready.wait(), 60)
        assert await asyncio.to_thread(scans.stuck.wait, 30)
        async with SurgeClient(kafka) as client:
            x = {"x": np.ones((1, 32), np.float32)}
            answer = await client.predict("mlp", x, timeout=30, topic=topic)
        assert answer.outputs
        async with asyncio.timeout(10):
            while not any(e["event"] == "model_scan_slow" for e in logs):
                await asyncio.sleep(0.05)
        worker.stop()
        await asyncio.wait_for(running, 30)
    assert worker.threads_left, "exit would wait for the scan's thread"
    assert [e["event"] for e in logs].count("model_scan_slow") == 1
    assert any(e["event"] == "model_scan_outlived_shutdown" for e in logs)
    scans.released.set()
    async with asyncio.timeout(10):
        while worker.threads_left:
            await asyncio.sleep(0.05)


async def test_a_stop_while_the_first_scan_hangs_ends_the_start_up(
    kafka: str, model_root: Path, hung_scans: Callable[[int], _HungScans]
) -> None:
    scans = hung_scans(1)
    worker = Worker(make_settings(kafka, model_root, None))
    running = asyncio.create_task(worker.run())
    assert await asyncio.to_thread(scans.stuck.wait, 30)
    worker.stop()
    await asyncio.wait_for(running, 15)
    assert not worker.ready.is_set()
    assert worker.threads_left
