"""Fixtures: real Kafka, Redis and noida-db on free loopback ports, example models, workers.

`SURGE_TEST_BOOTSTRAP` and `SURGE_TEST_REDIS_URL` point the suite at running services instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

# Imported here, at a shallow stack: first imported by its plugin deep inside pytest's
# summary, CPython 3.11.7 can fail to compile it ("AST constructor recursion depth mismatch").
import hypothesis  # noqa: F401
import pytest

from surge.config import Settings, load_settings
from surge.examples import write_mlp
from surge.workers import Worker
from tests.services import KafkaBroker, NoidaBroker, RedisServer

ROOT = Path(__file__).resolve().parent.parent

# Run in the background by a shell (nohup, `&` in a script), the suite would start with SIGINT
# ignored and hand that on to every command it starts, and those that check Ctrl-C would
# ignore it. Commands start with the default, as from a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def kafka() -> Iterator[str]:
    external = os.environ.get("SURGE_TEST_BOOTSTRAP")
    if external:
        yield external
        return
    broker = KafkaBroker().start()
    try:
        yield broker.bootstrap
    finally:
        broker.close()


@pytest.fixture(scope="session")
def strict_kafka() -> Iterator[str]:
    """A broker that creates topics only on request, as most production clusters do."""
    broker = KafkaBroker(auto_create_topics=False).start()
    try:
        yield broker.bootstrap
    finally:
        broker.close()


@pytest.fixture(scope="session")
def noida() -> Iterator[str]:
    broker = NoidaBroker().start()
    try:
        yield broker.bootstrap
    finally:
        broker.close()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    external = os.environ.get("SURGE_TEST_REDIS_URL")
    if external:
        yield external
        return
    with RedisServer() as server:
        yield server.url


@pytest.fixture
def model_root(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    write_mlp(root)
    return root


def worker_env(
    bootstrap: str, model_root: Path, redis_url: str | None, **extra: str
) -> dict[str, str]:
    """Settings for a worker, as the environment overrides `surge worker` reads. Each call
    gets request topics of its own (`topic_of(env, model)`), so tests never see each
    other's records."""
    env = {
        "SURGE_WORKER__TOPIC_PREFIX": f"test.{uuid.uuid4().hex[:8]}.requests.",
        "SURGE_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "SURGE_WORKER__MODEL_ROOT": str(model_root),
        "SURGE_WORKER__GROUP_ID": f"test-{uuid.uuid4().hex[:8]}",
        "SURGE_WORKER__TOPIC_PARTITIONS": "4",
        "SURGE_WORKER__COMMIT_INTERVAL_MS": "50",
        "SURGE_WORKER__RELOAD_INTERVAL_S": "0.5",
        "SURGE_LOG__FORMAT": "json",
    }
    if redis_url:
        env["SURGE_REDIS__URL"] = redis_url
    env.update(extra)
    return env


def topic_of(env: dict[str, str], model: str) -> str:
    return env["SURGE_WORKER__TOPIC_PREFIX"] + model


def make_settings(
    bootstrap: str, model_root: Path, redis_url: str | None, **extra: str
) -> Settings:
    return load_settings(env=worker_env(bootstrap, model_root, redis_url, **extra))


@pytest.fixture
async def run_worker() -> AsyncIterator[Callable[[Settings], asyncio.Task[None]]]:
    """Start in-process workers; each is stopped gracefully at teardown."""
    started: list[tuple[Worker, asyncio.Task[None]]] = []

    async def start(settings: Settings) -> Worker:
        worker = Worker(settings)
        task = asyncio.create_task(worker.run())
        started.append((worker, task))
        ready = asyncio.ensure_future(worker.ready.wait())
        await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED, timeout=60)
        if task.done():
            task.result()
        assert worker.ready.is_set(), "worker did not start"
        return worker

    yield start  # type: ignore[misc]
    for worker, _ in started:
        worker.stop()
    tasks = [task for _, task in started]
    # A worker stuck before its consume loop never sees stop(): cancel it rather than hang.
    _, stuck = await asyncio.wait(tasks, timeout=90) if tasks else (set(), set())
    for task in stuck:
        task.cancel()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    # A worker that crashed (a background task died: it stops itself and run() returns) or
    # hung fails the test that ran it, whatever that test checked before.
    assert not stuck, f"{len(stuck)} worker(s) did not stop within 90 s"
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    assert not [worker for worker, _ in started if worker.failed], "a worker crashed"


class WorkerProcess:
    """`surge worker` in a child process, as an operator runs it."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "surge", "worker"],
            env=os.environ | env,
            stdout=subprocess.DEVNULL,
            stderr=log.open("ab"),
            cwd=ROOT,
        )

    def events(self) -> list[dict[str, object]]:
        lines = self.log.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def wait_for(self, event: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("event") == event for e in self.events()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"worker never logged {event}:\n{self.log.read_text()[-3000:]}"
                )
            time.sleep(0.05)

    def terminate(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:  # say where it stood: the log goes with tmp_path
            raise AssertionError(
                f"worker still running {timeout:.0f} s after SIGTERM:\n"
                + self.log.read_text(errors="replace")[-6000:]
            ) from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def worker_processes(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], WorkerProcess]]:
    processes: list[WorkerProcess] = []

    def start(env: dict[str, str]) -> WorkerProcess:
        process = WorkerProcess(env, tmp_path / f"worker-{len(processes)}.log")
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.kill()
