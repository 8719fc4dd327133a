"""Shared benchmark plumbing: services, a worker process, its batch-size histogram."""

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


class WorkerProcess:
    def __init__(self, bootstrap: str, model_root: Path, **env: str) -> None:
        self.metrics_port = free_port()
        self.log = Path(tempfile.mkstemp(prefix="surge-bench-worker-", suffix=".log")[1])
        self.process = subprocess.Popen(
            [sys.executable, "-m", "surge", "worker"],
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

    def batch_histogram(self) -> tuple[np.ndarray, np.ndarray, float, float]:
        """(bucket upper bounds, cumulative counts, sum of rows, number of batches)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        bounds, counts, total, batches = [], [], 0.0, 0.0
        for family in text_string_to_metric_families(text):
            if family.name != "surge_batch_rows":
                continue
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    bounds.append(float(sample.labels["le"]))
                    counts.append(sample.value)
                elif sample.name.endswith("_sum"):
                    total += sample.value
                elif sample.name.endswith("_count"):
                    batches += sample.value
        return np.array(bounds), np.array(counts), total, batches

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)


def direct_throughput(model_path: Path, batch: int, threads: int, seconds: float = 2.0) -> float:
    """ONNX Runtime alone, no Kafka: rows per second at a given batch size (median of runs)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
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
