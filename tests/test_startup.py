"""Start-up against a cluster that is not there, or does not answer: one line and exit 1,
and a SIGTERM that ends the wait at once, with nothing left open."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import start_http_server

from surge.config import Settings
from surge.examples import write_mlp
from surge.workers import Worker
from tests.conftest import WorkerProcess, make_settings, worker_env
from tests.services import free_port

DELIVERIES = ["at_least_once", "exactly_once"]


class SilentBroker:
    """Takes connections and never answers, like a broker stuck in a long GC pause."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.bootstrap = f"127.0.0.1:{self._server.getsockname()[1]}"
        self.connected = threading.Event()
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._server.accept()
            except OSError:
                return
            self._held.append(connection)
            self.connected.set()

    def close(self) -> None:
        self._server.close()
        for connection in self._held:
            connection.close()


@pytest.fixture
def silent_broker() -> Iterator[SilentBroker]:
    broker = SilentBroker()
    yield broker
    broker.close()


def _output(worker: WorkerProcess) -> str:
    return worker.log.read_text(errors="replace")


@pytest.mark.parametrize("delivery", DELIVERIES)
def test_an_unreachable_cluster_fails_start_up_in_one_line(
    model_root: Path, worker_processes: Callable[[dict[str, str]], WorkerProcess], delivery: str
) -> None:
    bootstrap = f"127.0.0.1:{free_port()}"  # nothing listens there
    worker = worker_processes(
        worker_env(bootstrap, model_root, None, SURGE_WORKER__DELIVERY=delivery)
    )
    assert worker.process.wait(60) == 1
    failed = [e for e in worker.events() if e.get("event") == "startup_failed"]
    assert len(failed) == 1, _output(worker)
    assert failed[0]["bootstrap_servers"] == bootstrap
    assert "Traceback" not in _output(worker)
    assert "Unclosed" not in _output(worker)  # what start-up opened was closed


@pytest.mark.parametrize("delivery", DELIVERIES)
async def test_a_stop_while_the_cluster_does_not_answer_ends_start_up_at_once(
    model_root: Path,
    worker_processes: Callable[[dict[str, str]], WorkerProcess],
    silent_broker: SilentBroker,
    delivery: str,
) -> None:
    worker = worker_processes(
        worker_env(silent_broker.bootstrap, model_root, None, SURGE_WORKER__DELIVERY=delivery)
    )
    assert await asyncio.to_thread(silent_broker.connected.wait, 60), "never connected"
    await asyncio.sleep(0.5)  # waiting on the broker's answer
    started = time.monotonic()
    assert await asyncio.to_thread(worker.terminate, 60) == 0
    assert time.monotonic() - started < 10, "waited for the broker's answer"
    assert "worker_stopped" in [e.get("event") for e in worker.events()]
    assert "Traceback" not in _output(worker)
    assert "Unclosed" not in _output(worker)


def test_a_metrics_port_in_use_fails_start_up_in_one_line(
    model_root: Path, worker_processes: Callable[[dict[str, str]], WorkerProcess]
) -> None:
    port = free_port()
    start_http_server(port)  # taken, by this process
    env = worker_env("127.0.0.1:9", model_root, None, SURGE_METRICS__PORT=str(port))
    worker = worker_processes(env)
    assert worker.process.wait(60) == 1
    failed = [e for e in worker.events() if e.get("event") == "startup_failed"]
    assert len(failed) == 1, _output(worker)
    assert f"metrics port {port}" in str(failed[0]["error"])
    assert "Traceback" not in _output(worker)


@pytest.mark.integration
def test_a_topic_the_cluster_will_not_create_fails_start_up_in_one_line(
    kafka: str, model_root: Path, worker_processes: Callable[[dict[str, str]], WorkerProcess]
) -> None:
    env = worker_env(kafka, model_root, None, SURGE_WORKER__TOPIC_REPLICATION_FACTOR="3")
    worker = worker_processes(env)
    assert worker.process.wait(60) == 1
    failed = [e for e in worker.events() if e.get("event") == "startup_failed"]
    assert len(failed) == 1, _output(worker)
    assert "cannot create topic" in str(failed[0]["error"])
    assert "Traceback" not in _output(worker)


@pytest.mark.integration
async def test_a_model_whose_topic_would_be_the_dead_letter_topic_is_not_consumed_there(
    kafka: str, tmp_path: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    """Its letters would be consumed and dead-lettered again, for ever."""
    root = tmp_path / "models"
    write_mlp(root)
    (root / "mlp").rename(root / "letters")
    prefix = make_settings(kafka, root, None).worker.topic_prefix
    letters = f"{prefix}letters"
    env = {"SURGE_WORKER__TOPIC_PREFIX": prefix, "SURGE_WORKER__DEAD_LETTER_TOPIC": letters}
    worker = await run_worker(make_settings(kafka, root, None, **env))
    assert letters not in worker._topics
