"""Surge on an accelerator: end-to-end throughput against the model alone on the same device,
and the device's utilisation while the workers are saturated.

    python -m bench.gpu [--model minilm|mlp] [--format onnx|pt2|torchscript]
                        [--precision fp32|fp16|bf16] [--burst N] [--rounds N]
                        [--max-batch N] [--instances N] [--processes gpus|N]
                        [--broker kafka|embedded | --bootstrap HOST:PORT]

Starts a broker on this machine (Apache Kafka, or the embedded one where there is no JDK;
none with --bootstrap) and `surge worker --processes gpus` (one process per visible GPU; one
process on the CPU where there is none), with the model's batches up to --max-batch rows and
--instances calls in flight. The model runs on ONNX Runtime (the CUDA provider where a GPU
is visible), or (MiniLM only) on PyTorch in --precision, as a `torch.export` archive (pt2:
its graph runs op by op from Python) or as TorchScript traced on the device (its graph runs
in C++, without the interpreter lock). Drains --rounds bursts of requests while sampling
`nvidia-smi`, then runs the model alone with the same runtime on the same rows at the batch
size the workers actually ran, two ways: fed from host arrays, as a plain loop would, and
with every batch already in device memory (the model's compute alone). The target is an
end-to-end throughput of at least 80% of the faster of the two. Prints a table; writes
bench/out/gpu-<model>[-<format>-<precision>].json and a plot of utilisation over time (.png).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

from bench.common import (
    OUT,
    WorkerProcess,
    batch_rows,
    kafka_broker,
    ort_session,
    rows_per_second,
    scratch_dir,
)
from bench.e2e import WORKLOADS, Workload, _batch_stats, padded_batches
from surge.broker import start_noida, stop_noida
from surge.producers.load import run_load
from surge.workers.runtimes.devices import cuda_device_count
from tests.services import free_port

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

    def within(self, windows: list[tuple[float, float]]) -> tuple[float, float, float]:
        """(median GPU %, peak GPU %, peak memory MiB) over samples inside any window."""
        inside = [(g, m) for t, g, m in self.samples if any(a <= t <= b for a, b in windows)]
        if not inside:
            return float("nan"), float("nan"), float("nan")
        gpu = [g for g, _ in inside]
        return float(np.median(gpu)), max(gpu), max(m for _, m in inside)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)


def tune(config: Path, **values: int) -> None:
    """Set top-level keys of a model's config.toml, replacing the lines that set them."""
    text = config.read_text()
    for key, value in values.items():
        line = f"{key} = {value}"
        text, found = re.subn(rf"(?m)^{key} = .*$", line, text)
        if not found:
            text = f"{line}\n{text}"
    config.write_text(text)


def resident_throughput(path: Path, batches: list[dict[str, np.ndarray]]) -> float:
    """ONNX Runtime on the GPU with every batch's inputs already in device memory and its
    outputs left there: rows per second of the model's compute alone, no copies (median of
    3 passes over all batches)."""
    session = ort_session(path, gpu=True)
    outputs = [o.name for o in session.get_outputs()]
    bindings = []
    for inputs in batches:
        binding = session.io_binding()
        for name, array in inputs.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0))
        for name in outputs:
            binding.bind_output(name, "cuda", 0)
        bindings.append(binding)
    session.run_with_iobinding(bindings[0])

    def run() -> None:
        for binding in bindings:  # each run ends with the device synchronised
            session.run_with_iobinding(binding)

    return rows_per_second(run, batch_rows(batches))


def torch_throughput(
    path: Path, batches: list[dict[str, np.ndarray]], device: str
) -> tuple[float, float]:
    """PyTorch alone, rows per second (median of 3 passes over all batches): fed from host
    arrays (copied in, run, copied out, one batch at a time) and, on a GPU, with every
    batch's inputs already in device memory and its outputs left there (nan on the CPU)."""
    import torch

    from surge.workers.runtimes.torch_runtime import load_module

    module = load_module(path, device)

    def host_fed() -> None:
        for inputs in batches:
            module(*(torch.from_numpy(a).to(device) for a in inputs.values())).float().cpu()

    resident = [[torch.from_numpy(a).to(device) for a in b.values()] for b in batches]

    def on_device() -> None:
        for inputs in resident:
            module(*inputs)
        if device != "cpu":
            torch.cuda.synchronize(device)

    def rate(run: Callable[[], None]) -> float:
        with torch.inference_mode():
            run()  # warm-up: kernels chosen, memory pooled
            return rows_per_second(run, batch_rows(batches))

    return rate(host_fed), rate(on_device) if device != "cpu" else float("nan")


@contextmanager
def broker(kind: str, bootstrap: str | None) -> Iterator[str]:
    """The cluster at `bootstrap`, else a fresh broker of `kind` on loopback."""
    if kind == "kafka" or bootstrap:
        with kafka_broker(bootstrap) as servers:
            yield servers
        return
    data, port = Path(tempfile.mkdtemp(prefix="surge-bench-broker-")), free_port()
    process = start_noida(data, port)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop_noida(process)
        shutil.rmtree(data, ignore_errors=True)


# What --format writes, by the model file's name.
ARTIFACTS = {"onnx": "model.onnx", "pt2": "model.pt2", "torchscript": "model.pt"}


def sent_rows(workload: Workload, count: int) -> list[dict[str, np.ndarray]]:
    """The rows a burst of `count` sent, shortest first: how little batches can pad."""
    sent = [workload.inputs(i) for i in range(count)]
    return sorted(sent, key=lambda r: max(a.shape[-1] for a in r.values()))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--bootstrap", help="use this Kafka cluster instead of starting one")
    parser.add_argument(
        "--broker", choices=["kafka", "embedded"], default="kafka", help="the broker to start"
    )
    parser.add_argument("--model", choices=sorted(WORKLOADS), default="minilm")
    parser.add_argument("--format", choices=sorted(ARTIFACTS), default="onnx")
    parser.add_argument(
        "--precision", choices=["fp32", "fp16", "bf16"], default="fp32", help="PyTorch formats"
    )
    parser.add_argument("--burst", type=int, help="requests per burst (model default × 25)")
    parser.add_argument("--rounds", type=int, default=3, help="bursts; the median is reported")
    parser.add_argument("--max-batch", type=int, default=256, help="the model's max_batch_size")
    parser.add_argument("--instances", type=int, default=2, help="model calls in flight")
    parser.add_argument("--processes", default="gpus", help="worker processes: gpus or N")
    args = parser.parse_args()
    on_torch = args.format != "onnx"
    if on_torch and args.model != "minilm":
        parser.error(f"--format {args.format} serves --model minilm")
    if not on_torch and args.precision != "fp32":
        parser.error("--precision applies to the PyTorch formats (the ONNX export is fp32)")
    workload = WORKLOADS[args.model]()
    burst = args.burst or workload.burst * 25
    gpus = cuda_device_count()
    device = f"{gpus} GPU(s)" if gpus else "the CPU (no GPU visible)"

    model_root = scratch_dir("surge-bench-models-")
    if on_torch:
        from surge.minilm import write_minilm

        model_path = write_minilm(
            model_root,
            artifact=ARTIFACTS[args.format],
            precision=args.precision,
            device="cuda" if gpus else "cpu",
        )
    else:
        model_path = workload.write(model_root)
    tune(
        model_path.parent.parent / "config.toml",
        max_batch_size=args.max_batch,
        instances=args.instances,
    )
    utilisation = Utilisation()
    throughputs, windows = [], []
    with broker(args.broker, args.bootstrap) as bootstrap:
        worker = WorkerProcess(bootstrap, model_root, processes=args.processes)
        try:
            worker.first_result(workload.name, workload.inputs(0))
            asyncio.run(run_load(bootstrap, workload.name, workload.inputs, count=burst // 5))
            before = worker.batch_totals()
            for _ in range(args.rounds):
                # From the first request sent to the last result: encoding the burst and
                # creating the reply topic, while the GPU idles, are no part of it.
                window: list[float] = []
                report = asyncio.run(
                    run_load(
                        bootstrap,
                        workload.name,
                        workload.inputs,
                        count=burst,
                        on_first_send=_stamp(window),
                        on_last_result=_stamp(window),
                    )
                )
                # Without its last result (some never came), the window ends now.
                windows.append((window[0], window[1] if len(window) > 1 else time.monotonic()))
                throughputs.append(report.throughput)
                console.print(f"burst: {report.throughput:,.0f} req/s")
            stats = _batch_stats(before, worker.batch_totals())
        finally:
            worker.stop()
            utilisation.stop()
    throughput = float(np.median(throughputs))
    batch = max(1, round(stats["mean_rows"]))
    batches = padded_batches(sent_rows(workload, burst), batch)
    if on_torch:
        host_fed, resident = torch_throughput(model_path, batches, "cuda:0" if gpus else "cpu")
    else:
        host_fed = workload.direct(model_path, batch, gpus > 0, burst, best_only=True)["best"]
        resident = resident_throughput(model_path, batches) if gpus else float("nan")
    # Measured on one device: with one worker per GPU, the pool's share of it is what compares.
    per_device = max(1, gpus) if args.processes == "gpus" else 1
    alone = (max(host_fed, resident) if gpus else host_fed) * per_device
    median_gpu, peak_gpu, memory = utilisation.within(windows)
    runtime = f"PyTorch {args.format} {args.precision}" if on_torch else "ONNX Runtime"
    table = Table(
        title=f"Surge on {device}: {workload.name} ({runtime}), {args.rounds} bursts of {burst:,}"
    )
    for column in ("", "value"):
        table.add_column(column, justify="right")
    spread = f"{min(throughputs):,.0f}–{max(throughputs):,.0f}"
    table.add_row("end to end, median burst", f"{throughput:,.0f} req/s ({spread})")
    table.add_row("model alone, fed from host arrays", f"{host_fed:,.0f} rows/s at {batch}")
    if gpus:
        table.add_row("model alone, inputs on the device", f"{resident:,.0f} rows/s at {batch}")
    label = (
        f"end to end ÷ model alone × {per_device} GPUs"
        if per_device > 1
        else "end to end ÷ model alone"
    )
    table.add_row(label, f"{throughput / alone:.0%} (target ≥ 80%)")
    table.add_row(
        "mean batch, mean model call",
        f"{stats['mean_rows']:.1f} rows, {stats['mean_call_ms']:.2f} ms",
    )
    if utilisation.samples:
        table.add_row(
            "GPU utilisation in bursts, median / peak", f"{median_gpu:.0f}% / {peak_gpu:.0f}%"
        )
        table.add_row("GPU memory, peak", f"{memory:,.0f} MiB")
    console.print(table)
    OUT.mkdir(exist_ok=True)
    name = f"{workload.name}-{args.format}-{args.precision}" if on_torch else workload.name
    out = OUT / f"gpu-{name}.json"
    out.write_text(
        json.dumps(
            {
                "device": device,
                "gpu_name": _gpu_name(),
                "format": args.format,
                "precision": args.precision,
                "processes": args.processes,
                "burst": burst,
                "rounds": throughputs,
                "max_batch": args.max_batch,
                "instances": args.instances,
                "throughput": throughput,
                "model_alone_host_fed": host_fed,
                "model_alone_resident": resident,
                "batch": batch,
                "ratio": throughput / alone,
                "gpu_util_median": median_gpu,
                "gpu_util_peak": peak_gpu,
                "gpu_memory_peak_mib": memory,
                **stats,
            },
            indent=2,
        )
    )
    _plot(utilisation, windows, throughputs, OUT / f"gpu-{name}.png", name)
    console.print(f"wrote {out}")


def _gpu_name() -> str:
    if not shutil.which("nvidia-smi"):
        return ""
    done = subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
    )
    return done.stdout.strip()


def _plot(
    utilisation: Utilisation,
    windows: list[tuple[float, float]],
    throughputs: list[float],
    path: Path,
    model: str,
) -> None:
    """GPU utilisation over the run, each burst shaded and labelled with its throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    origin = windows[0][0] - 1.0 if windows else 0.0
    samples = [(t - origin, g) for t, g, _ in utilisation.samples if t >= origin]
    if samples:
        ax.plot(*zip(*samples, strict=True), lw=1)
    for (start, end), rate in zip(windows, throughputs, strict=True):
        ax.axvspan(start - origin, end - origin, alpha=0.15)
        ax.text((start + end) / 2 - origin, 102, f"{rate:,.0f}/s", ha="center", fontsize=8)
    ax.set(xlabel="seconds", ylabel="GPU utilisation %", ylim=(0, 110))
    ax.set_title(f"{model}: GPU utilisation, bursts shaded", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _stamp(times: list[float]) -> Callable[[], None]:
    """A callback that notes when it is called."""
    return lambda: times.append(time.monotonic())


if __name__ == "__main__":
    main()
