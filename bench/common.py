"""Shared benchmark plumbing: services, a worker process, its batch and latency histograms."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnxruntime as ort
from prometheus_client.parser import text_string_to_metric_families

from tests.services import KafkaBroker, free_port

OUT = Path(__file__).parent / "out"


@contextmanager
def kafka_broker(bootstrap: str | None) -> Iterator[str]:
    """An existing cluster, or a fresh single-node Apache Kafka on loopback."""
    if bootstrap:
        yield bootstrap
        return
    broker = KafkaBroker(heap="1g").start()
    try:
        yield broker.bootstrap
    finally:
        broker.close()


def providers(gpu: bool) -> list[str]:
    """ONNX Runtime providers for the model alone: CUDA first when asked for."""
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]


class WorkerProcess:
    def __init__(
        self, bootstrap: str, model_root: Path, *, processes: int | str = 1, **env: str
    ) -> None:
        self.metrics_port = free_port()
        self.log = Path(tempfile.mkstemp(prefix="surge-bench-worker-", suffix=".log")[1])
        self.process = subprocess.Popen(
            [sys.executable, "-m", "surge", "worker", "--processes", str(processes)],
            env=os.environ
            | {
                "SURGE_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
                "SURGE_WORKER__MODEL_ROOT": str(model_root),
                "SURGE_WORKER__GROUP_ID": f"bench-{time.time_ns()}",
                "SURGE_METRICS__PORT": str(self.metrics_port),
                "SURGE_LOG__FORMAT": "json",
                **env,
            },
            stderr=self.log.open("wb"),
        )

    def batch_totals(self) -> dict[str, float]:
        """Model calls so far: their number, rows and seconds (from the worker's metrics)."""
        totals = {"batches": 0.0, "rows": 0.0, "seconds": 0.0}
        for family in text_string_to_metric_families(self._metrics()):
            for sample in family.samples:
                if sample.name == "surge_batch_rows_count":
                    totals["batches"] += sample.value
                elif sample.name == "surge_batch_rows_sum":
                    totals["rows"] += sample.value
                elif sample.name == "surge_batch_seconds_sum":
                    totals["seconds"] += sample.value
        return totals

    def latency_buckets(self) -> dict[str, dict[float, float]]:
        """The worker's own latency histograms, cumulative counts by bucket bound (summed
        over topics and targets): `age` (record age at intake) and `outcome` (intake to a
        durable result)."""
        names = {
            "surge_record_age_seconds_bucket": "age",
            "surge_outcome_seconds_bucket": "outcome",
        }
        buckets: dict[str, dict[float, float]] = {"age": {}, "outcome": {}}
        for family in text_string_to_metric_families(self._metrics()):
            for sample in family.samples:
                if sample.name in names:
                    counts = buckets[names[sample.name]]
                    bound = float(sample.labels["le"])
                    counts[bound] = counts.get(bound, 0.0) + sample.value
        return buckets

    def _metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        return urllib.request.urlopen(url, timeout=5).read().decode()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)


def direct_throughput(
    model_path: Path, batch: int, threads: int, seconds: float = 2.0, *, gpu: bool = False
) -> float:
    """ONNX Runtime alone, no Kafka: rows per second at a given batch size (median of runs)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_path), options, providers=providers(gpu))
    x = np.random.default_rng(0).standard_normal((batch, 32)).astype(np.float32)
    for _ in range(20):
        session.run(None, {"x": x})
    rates = []
    for _ in range(5):
        calls, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds / 5:
            session.run(None, {"x": x})
            calls += 1
        rates.append(calls * batch / elapsed)
    return float(np.median(rates))
