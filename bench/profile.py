"""Where a Surge worker spends its CPU per request, measured with a sampling profiler.

    python -m bench.profile [--bootstrap HOST:PORT] [--requests 50000] [--delivery at_least_once]
                            [--offered REQ_PER_S]

Starts Apache Kafka (unless --bootstrap) and one `surge worker`, publishes a burst of msgpack
MLP requests once the worker has joined, and samples the worker with py-spy until every reply
is written. The worker's CPU time (user + system) over the drain, divided by the requests,
is the cost per request (with `--offered`, the requests are sent at that rate instead, open
loop, as `bench.e2e` sends them: the cost of light load); py-spy's samples of threads holding
the GIL split it into stages (waits are left out; so is the model's own time, spent outside
the GIL). Prints a table, writes bench/out/profile.json and the raw samples to
bench/out/profile.txt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
from rich.console import Console
from rich.table import Table

from bench.common import OUT, WorkerProcess, kafka_broker, scratch_dir
from bench.compare import _preload, _reply_stamps, _wait_for, span_rate
from surge.examples import MLP_FEATURES, MLP_NAME, write_mlp
from surge.producers.load import run_load

console = Console()

# Each sample is charged to the first stage (from the innermost frame out) that it matches.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("model (ONNX Runtime)", ("onnxruntime",)),
    ("encode results", ("workers/replies.py", "row_tensors", "from_array", "_answer")),
    ("decode + validate", ("workers/intake.py", "schemas/codec.py", "schemas/tensors.py")),
    ("route (headers)", ("workers/tickets.py",)),
    ("batch: stack, split", ("workers/batching.py",)),
    (
        "record batches, produce",
        ("workers/writes.py", "workers/acked.py", "aiokafka/producer", "aiokafka/record"),
    ),
    ("fetch + parse records", ("aiokafka/consumer", "aiokafka/protocol", "workers/fetched.py")),
    ("batcher, ledger, offsets", ("workers/batcher.py", "workers/ledger.py", "workers/offsets")),
    ("consume loop", ("workers/worker.py",)),
    ("network, event loop", ("aiokafka/conn.py", "asyncio/", "selectors.py")),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--bootstrap", help="use this Kafka cluster instead of starting one")
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--delivery", default="at_least_once")
    parser.add_argument("--rate", type=int, default=1000, help="py-spy samples per second")
    parser.add_argument(
        "--offered", type=float, help="send the requests at this rate (req/s), not as a burst"
    )
    args = parser.parse_args()

    model_root = scratch_dir("surge-bench-models-")
    write_mlp(model_root)
    samples_file = OUT / "profile.txt"
    OUT.mkdir(exist_ok=True)
    run = f"profile.{time.time_ns()}"
    topic, replies = f"bench.{run}.requests", f"bench.{run}.replies"
    with kafka_broker(args.bootstrap) as bootstrap:
        asyncio.run(_preload(bootstrap, topic, replies, 0))  # topics only
        worker = WorkerProcess(
            bootstrap,
            model_root,
            SURGE_WORKER__TOPICS=json.dumps({"mlp": topic}),
            SURGE_WORKER__DELIVERY=args.delivery,
            SURGE_WORKER__CREATE_TOPICS="false",
        )
        try:
            _wait_for_log(worker.log, "partitions_assigned")
            process = psutil.Process(worker.process.pid)
            command = [_py_spy(), "record", "-p", str(worker.process.pid), "-r", str(args.rate)]
            command += ["--threads", "--nonblocking", "--gil"]  # GIL holders: CPU, not waits
            spy = subprocess.Popen(
                [*command, "-f", "raw", "-o", str(samples_file)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)  # py-spy attached
            before = process.cpu_times()
            started = time.perf_counter()
            if args.offered:
                asyncio.run(_offer(bootstrap, topic, replies, args.requests, args.offered))
            else:
                asyncio.run(_preload(bootstrap, topic, replies, args.requests, create=False))
                asyncio.run(_wait_for(bootstrap, replies, args.requests, timeout=300, settle=0))
            elapsed = time.perf_counter() - started
            after = process.cpu_times()
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
            # The drain's rate over its replies' timestamps, as `bench.compare` measures it:
            # encoding and publishing the burst, before the worker has much to do, left out.
            stamps, answered, _, _ = asyncio.run(_reply_stamps(bootstrap, replies))
            drained = span_rate(stamps, answered)[1]
        finally:
            worker.stop()
    cpu_s = (after.user - before.user) + (after.system - before.system)
    per_request_us = cpu_s / args.requests * 1e6
    shares = _stages(samples_file)
    _report(args.requests, elapsed, drained, per_request_us, shares, args.offered)


async def _offer(bootstrap: str, topic: str, replies: str, count: int, rate: float) -> None:
    """`count` MLP requests at `rate` per second, open loop, until every result is back."""
    rows = np.random.default_rng(0).standard_normal((1024, 1, MLP_FEATURES)).astype(np.float32)
    report = await run_load(
        bootstrap,
        MLP_NAME,
        lambda i: {"x": rows[i % len(rows)]},
        count=count,
        rate=rate,
        topic=topic,
        reply_topic=replies,
        timeout_s=count / rate + 60,
    )
    if report.received < count:
        raise SystemExit(f"{count - report.received} of {count} results never came")
    latencies = report.latencies_ms
    console.print(
        f"offered {rate:,.0f}/s: p50 {np.percentile(latencies, 50):.1f} ms, "
        f"p99 {np.percentile(latencies, 99):.1f} ms"
    )


def _py_spy() -> str:
    """py-spy from this interpreter's environment (the dev extras install it there, and a
    virtual environment run without activating it is not on PATH), else from PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else "py-spy"


def _wait_for_log(log: Path, event: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while event not in log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise SystemExit(f"worker never logged {event}:\n{log.read_text()[-2000:]}")
        time.sleep(0.1)


def _stages(samples_file: Path) -> Counter[str]:
    """Samples per stage, from py-spy's raw (collapsed-stack) output."""
    counts: Counter[str] = Counter()
    for line in samples_file.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")[::-1]  # innermost first
        counts[_stage(frames)] += int(count)
    return counts


def _stage(frames: list[str]) -> str:
    for frame in frames:
        for stage, needles in STAGES:
            if any(needle in frame for needle in needles):
                return stage
    return "other"


def _report(
    requests: int,
    elapsed: float,
    drained: float,
    per_request_us: float,
    shares: Counter[str],
    offered: float | None,
) -> None:
    total = sum(shares.values()) or 1
    table = Table(title=f"Surge worker CPU per request ({requests:,} requests, one worker)")
    for column in ("stage", "share of samples", "µs per request"):
        table.add_column(column, justify="right")
    rows = []
    for stage, count in shares.most_common():
        share = count / total
        table.add_row(stage, f"{share:.1%}", f"{share * per_request_us:.1f}")
        rows.append({"stage": stage, "share": share, "us_per_request": share * per_request_us})
    table.add_row("all", "100%", f"{per_request_us:.1f}")
    console.print(table)
    if offered:
        console.print(f"offered at {offered:,.0f}/s: {elapsed:.1f} s in all, client start included")
    else:
        console.print(f"drained at {drained:,.0f} req/s (over its replies' timestamps)")
    (OUT / "profile.json").write_text(
        json.dumps(
            {
                "requests": requests,
                "elapsed_s": elapsed,
                "drained_per_s": None if offered else drained,
                "cpu_us_per_request": per_request_us,
                "offered_per_s": offered,
                "stages": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
