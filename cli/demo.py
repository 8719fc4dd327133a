"""`surge demo`: the whole path on one machine, in one command.

Embedded broker, a worker process serving an example model, a burst of requests published
with a plain Kafka producer, then a steady load; prints throughput, latency and batch sizes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from surge.broker import ctrl_c_held, start_noida
from surge.config.loader import ENV_PREFIX
from surge.examples import MLP_FEATURES, MLP_NAME, write_mlp
from surge.producers import SurgeClient
from surge.producers.load import LoadReport, run_load, shared_reply_topic

console = Console()
T = TypeVar("T")
_WORKER_CHECK_S = 0.5  # how often a phase looks at the worker process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DemoError(RuntimeError):
    """The demo stopped early; the message says why and where to look."""


def run_demo(*, requests: int, rate: float) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="surge-demo-"))
    port, metrics_port = _free_port(), _free_port()
    bootstrap = f"127.0.0.1:{port}"
    worker_log = workdir / "worker.log"
    with contextlib.ExitStack() as cleanup:  # in reverse: the worker, the broker, its data
        # The broker's log segments and the model are tens of MB a run: only the log stays.
        cleanup.callback(shutil.rmtree, workdir / "broker", ignore_errors=True)
        cleanup.callback(shutil.rmtree, workdir / "models", ignore_errors=True)
        with console.status("starting the embedded broker (noida-db)"):
            # Its log beside the worker's: kept, while the broker's data goes.
            start_noida(workdir / "broker", port, log_path=workdir / "noida.log", stop_with=cleanup)
        write_mlp(workdir / "models")
        # The demo's own settings only: a SURGE_ variable of the user's (a cluster's address,
        # SASL, a TLS file) would send its worker elsewhere or stop it.
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)} | {
            "SURGE_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "SURGE_WORKER__MODEL_ROOT": str(workdir / "models"),
            "SURGE_WORKER__GROUP_ID": "surge-demo",
            "SURGE_METRICS__PORT": str(metrics_port),
            "SURGE_LOG__FORMAT": "json",
        }
        with ctrl_c_held() as held, worker_log.open("wb") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "surge", "worker"], env=env, stderr=log
            )
            cleanup.callback(_stop_worker, worker)
        if held:
            signal.raise_signal(signal.SIGINT)  # as it would have been, now it stops the worker
        rng = np.random.default_rng(0)
        features = rng.standard_normal((1024, 1, MLP_FEATURES)).astype(np.float32)

        def inputs(i: int) -> dict[str, np.ndarray]:
            return {"x": features[i % len(features)]}

        with console.status("worker starting: waiting for its first result"):
            started = time.perf_counter()
            try:
                asyncio.run(_first_result(bootstrap, inputs(0), worker, worker_log))
            except TimeoutError:
                raise DemoError(f"no result from the worker in time; see {worker_log}") from None
            ready_s = time.perf_counter() - started
        with shared_reply_topic(bootstrap) as replies:  # one for both phases, as a client keeps
            load = functools.partial(run_load, bootstrap, MLP_NAME, inputs, reply_topic=replies)
            with console.status(f"burst: {requests:,} requests published at once"):
                burst = asyncio.run(_while_alive(worker, worker_log, load(count=requests)))
            with console.status(f"steady load: {rate:,.0f} requests/s for 5 s"):
                steady_load = load(count=max(1, int(rate * 5)), rate=rate)
                steady = asyncio.run(_while_alive(worker, worker_log, steady_load))
        batches = _batch_sizes(metrics_port)
    _print_summary(ready_s, burst, steady, batches)
    console.print(f"worker log: {worker_log}")
    sent = burst.sent + steady.sent
    ok = burst.statuses.get("ok", 0) + steady.statuses.get("ok", 0)
    if ok == sent:
        return 0
    missing = sent - burst.received - steady.received
    console.print(
        f"[red]{sent - ok:,} of {sent:,} requests got no ok result ({missing:,} none at all)"
        f"[/red]: see the worker log"
    )
    return 1


async def _while_alive(
    worker: subprocess.Popen[bytes],
    worker_log: Path,
    phase: Coroutine[Any, Any, T],
    *,
    when: str = "while serving",
) -> T:
    """Run a phase, unless the worker exits meanwhile: then stop at once and say so, rather
    than wait out the phase's timeout for results that cannot come."""
    running = asyncio.ensure_future(phase)
    try:
        # A Popen child cannot be awaited from this loop: look at it between waits.
        while not (await asyncio.wait({running}, timeout=_WORKER_CHECK_S))[0]:
            if worker.poll() is not None:
                raise DemoError(
                    f"the worker exited with status {worker.returncode} {when}; see {worker_log}"
                )
        return running.result()
    finally:  # the worker gone, or Ctrl-C: what the phase was waiting for goes unread
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def _first_result(
    bootstrap: str,
    inputs: dict[str, np.ndarray],
    worker: subprocess.Popen[bytes],
    worker_log: Path,
) -> None:
    """Wait for the worker to answer, or to exit: a start-up failure must not cost 120 s."""
    async with SurgeClient(bootstrap) as client:
        first = client.predict(MLP_NAME, inputs, timeout=120)
        await _while_alive(worker, worker_log, first, when="before serving")


def _stop_worker(worker: subprocess.Popen[bytes]) -> None:
    """SIGTERM lets it drain; one that does not stop in time is killed."""
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(30)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def _batch_sizes(port: int) -> dict[str, float]:
    """Rows per model call, from the worker's Prometheus histogram: bucket -> share of batches
    (none if the worker no longer answers)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return {}
    buckets: list[tuple[float, float]] = []
    for family in text_string_to_metric_families(text):
        if family.name == "surge_batch_rows":
            buckets = [
                (float(s.labels["le"]), s.value)
                for s in family.samples
                if s.name.endswith("_bucket")
            ]
    shares: dict[str, float] = {}
    total = buckets[-1][1] if buckets else 0
    previous_le, previous = 0.0, 0.0
    for le, cumulative in buckets:
        if cumulative > previous and total:
            label = (
                f"{int(previous_le) + 1}–{int(le)}"
                if le != float("inf")
                else f">{int(previous_le)}"
            )
            shares[label] = (cumulative - previous) / total
        previous_le, previous = le, cumulative
    return shares


def _print_summary(
    ready_s: float, burst: LoadReport, steady: LoadReport, batches: dict[str, float]
) -> None:
    table = Table(title="Surge demo: MLP 32→256→256→10 on the embedded broker")
    for column in ("phase", "requests", "results", "not ok", "throughput", "p50", "p99"):
        table.add_column(column, justify="right")
    for name, report in (("burst", burst), (f"steady {steady.offered_rate:,.0f}/s", steady)):
        failed = report.received - report.statuses.get("ok", 0)
        table.add_row(
            name,
            f"{report.sent:,}",
            f"{report.received:,}",
            f"{failed:,}" if failed else "0",
            f"{report.throughput:,.0f} req/s",
            f"{report.percentile(50):.1f} ms",
            f"{report.percentile(99):.1f} ms",
        )
    console.print(table)
    sizes = Table(title="rows per model call (share of batches)")
    sizes.add_column("rows")
    sizes.add_column("share", justify="right")
    for label, share in batches.items():
        sizes.add_row(label, f"{share:.1%}")
    console.print(sizes)
    console.print(f"first result {ready_s:.1f} s after the worker was launched")
