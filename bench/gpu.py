"""Surge on an accelerator: end-to-end throughput against the model alone on the same device,
and the device's utilisation while the workers are saturated.

    python -m bench.gpu [--model minilm|mlp] [--burst N] [--bootstrap HOST:PORT]

Starts Apache Kafka on this machine (unless --bootstrap) and `surge worker --processes gpus`
(one process per visible GPU; one process on the CPU where there is none), drains a burst of
requests, samples `nvidia-smi` while it drains, then runs the model alone (ONNX Runtime, CUDA
provider when a GPU is visible) at the batch size the workers actually ran. The target is an
end-to-end throughput of at least 80% of the model alone. Prints a table, writes
bench/out/gpu-<model>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.common import OUT, WorkerProcess, kafka_broker
from bench.e2e import WORKLOADS, _batch_stats, _first_result
from surge.producers.load import run_load
from surge.workers.runtimes.devices import cuda_device_count

console = Console()


class Utilisation:
    """`nvidia-smi` sampled every 100 ms in the background: (time, GPU %, memory MiB)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []
        self._process: subprocess.Popen[str] | None = None
        if shutil.which("nvidia-smi"):
            query = "--query-gpu=utilization.gpu,memory.used"
            self._process = subprocess.Popen(
                ["nvidia-smi", query, "--format=csv,noheader,nounits", "-lms", "100"],
                stdout=subprocess.PIPE,
                text=True,
            )
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._process is not None
        assert self._process.stdout is not None
        for line in self._process.stdout:
            try:  # one line per GPU
                gpu, memory = (float(v) for v in line.split(","))
            except ValueError:
                continue
            self.samples.append((time.monotonic(), gpu, memory))

    def between(self, start: float, end: float) -> tuple[float, float, float]:
        """(median GPU %, peak GPU %, peak memory MiB) between two monotonic times."""
        window = [(g, m) for t, g, m in self.samples if start <= t <= end]
        if not window:
            return float("nan"), float("nan"), float("nan")
        gpu = [g for g, _ in window]
        return float(np.median(gpu)), max(gpu), max(m for _, m in window)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--bootstrap", help="use this Kafka cluster instead of starting one")
    parser.add_argument("--model", choices=sorted(WORKLOADS), default="minilm")
    parser.add_argument("--burst", type=int, help="requests queued at once (model default)")
    args = parser.parse_args()
    workload = WORKLOADS[args.model]()
    burst = args.burst or workload.burst * 5
    gpus = cuda_device_count()
    device = f"{gpus} GPU(s)" if gpus else "the CPU (no GPU visible)"

    model_root = Path(tempfile.mkdtemp(prefix="surge-bench-models-"))
    model_path = workload.write(model_root)
    utilisation = Utilisation()
    with kafka_broker(args.bootstrap) as bootstrap:
        worker = WorkerProcess(bootstrap, model_root, processes="gpus")
        try:
            asyncio.run(_first_result(bootstrap, workload.name, workload.inputs(0)))
            asyncio.run(run_load(bootstrap, workload.name, workload.inputs, count=burst // 5))
            before = worker.batch_totals()
            started = time.monotonic()
            report = asyncio.run(run_load(bootstrap, workload.name, workload.inputs, count=burst))
            ended = time.monotonic()
            stats = _batch_stats(before, worker.batch_totals())
        finally:
            worker.stop()
            utilisation.stop()
    batch = max(1, round(stats["mean_rows"]))
    alone = next(iter(workload.direct(model_path, batch, gpus > 0, burst).values()))  # best
    median_gpu, peak_gpu, memory = utilisation.between(started, ended)
    ratio = report.throughput / alone
    table = Table(title=f"Surge on {device}: {workload.name}, a burst of {burst:,}")
    for column in ("", "value"):
        table.add_column(column, justify="right")
    table.add_row("end to end", f"{report.throughput:,.0f} req/s")
    table.add_row("model alone, same batch", f"{alone:,.0f} rows/s at {batch}")
    table.add_row("end to end ÷ model alone", f"{ratio:.0%} (target ≥ 80%)")
    table.add_row("mean model call", f"{stats['mean_call_ms']:.2f} ms")
    table.add_row("GPU utilisation, median / peak", f"{median_gpu:.0f}% / {peak_gpu:.0f}%")
    table.add_row("GPU memory, peak", f"{memory:,.0f} MiB")
    console.print(table)
    OUT.mkdir(exist_ok=True)
    out = OUT / f"gpu-{workload.name}.json"
    out.write_text(
        json.dumps(
            {
                "device": device,
                "burst": burst,
                "throughput": report.throughput,
                "model_alone": alone,
                "batch": batch,
                "ratio": ratio,
                "gpu_util_median": median_gpu,
                "gpu_util_peak": peak_gpu,
                "gpu_memory_peak_mib": memory,
                **stats,
            },
            indent=2,
        )
    )
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
