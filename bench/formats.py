"""MiniLM's model files side by side, as a worker calls them: several instances at once, with
and without a busy event loop beside them.

    python -m bench.formats [--instances N] [--batch N] [--calls N] [--device cpu|cuda]

A worker's event loop (decode, batch, encode, publish) runs Python while the model's calls
run in executor threads. ONNX Runtime and TorchScript run a whole call in C++ with the
interpreter lock released; a `torch.export` archive (model.pt2) runs its graph one operation
at a time from Python, taking the lock between operations, so a busy event loop makes every
operation wait for it. Each format runs `--calls` batches per instance from `--instances`
threads at once, alone and then beside a thread that runs Python without pause (the worst
an event loop does); rows per second, median of 3 runs. Prints a table.
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import msgspec
import numpy as np
from rich.console import Console
from rich.table import Table

from bench.common import batch_rows, rows_per_second, scratch_dir
from bench.e2e import WORKLOADS, padded_batches
from surge.config import ModelConfig, convert, read_toml
from surge.minilm import write_minilm
from surge.workers import runtimes

console = Console()
FORMATS = {"ONNX Runtime": "model.onnx", "TorchScript": "model.pt", "torch.export": "model.pt2"}


@contextmanager
def busy_interpreter() -> Iterator[None]:
    """A thread that runs Python without pause for as long as the block lasts."""
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    thread = threading.Thread(target=spin)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def concurrent_rate(
    run: Callable[[dict[str, np.ndarray]], object],
    batches: list[dict[str, np.ndarray]],
    instances: int,
) -> float:
    """All batches, `instances` calls at a time: rows per second (median of 3 passes)."""
    with ThreadPoolExecutor(instances) as pool:
        list(pool.map(run, batches[:instances]))  # warm-up
        return rows_per_second(lambda: list(pool.map(run, batches)), batch_rows(batches))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--calls", type=int, default=4, help="batches per instance")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    workload = WORKLOADS["minilm"]()
    count = args.batch * args.calls * args.instances
    batches = padded_batches([workload.inputs(i) for i in range(count)], args.batch)
    table = Table(
        title=f"MiniLM on {args.device}: {args.instances} instances, batches of {args.batch}"
    )
    for column in ("model file", "alone", "beside busy Python", "kept"):
        table.add_column(column, justify="right")
    root = scratch_dir("surge-bench-formats-")
    for name, artifact in FORMATS.items():
        if artifact == "model.onnx" and args.device != "cpu":
            continue  # the ONNX export's GPU path is bench.gpu's
        path = write_minilm(root / artifact, artifact=artifact, device=args.device)
        config = convert(read_toml(path.parent.parent / "config.toml"), ModelConfig, "minilm")
        config = msgspec.structs.replace(config, instances=args.instances, device=args.device)
        runtime = runtimes.load(path, config)
        alone = concurrent_rate(runtime.run, batches, args.instances)
        with busy_interpreter():
            beside = concurrent_rate(runtime.run, batches, args.instances)
        table.add_row(
            f"{name} ({artifact})", f"{alone:,.0f}", f"{beside:,.0f}", f"{beside / alone:.0%}"
        )
        runtime.close()
    console.print(table)


if __name__ == "__main__":
    main()
