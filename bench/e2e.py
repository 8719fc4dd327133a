"""End-to-end throughput and latency through Kafka and one Surge worker, for the MLP and for
MiniLM (a real transformer), with results to a Kafka reply topic or to Redis.

    python -m bench.e2e [--model mlp|minilm] [--via kafka|redis] [--burst N] [--rates R,R,..]
                        [--rounds N]

Starts Apache Kafka (unless --bootstrap) and Redis (for --via redis), one `surge worker`
process and a load generator on this machine; drains a burst, then sweeps offered loads
(open loop), and compares with ONNX Runtime alone at the batch size the worker actually ran
(for MiniLM: the same sentences, padded per batch as the worker pads them). After the sweep,
one phase runs at half the burst's throughput, where the latency target is set, and one more
at that rate with each request held up to 5 ms to go out with others, as Kafka's own producer
and librdkafka hold them by default (`linger.ms`; the wait counts in its latency). Each phase also
reports where its latency went: the results' own hop through the broker (record timestamp to
receipt), and from the worker's histograms how old requests were when it took them in and how
long each took from there to a durable result (p99 as the bound of its bucket), and where the
CPU went: the worker's share of a core and how long its threads waited for one, the broker's
and this load generator's shares (they run on the same machine), and how busy it was. Before
all that, 15 s of load at the first rate warm up the broker's JIT. With --rounds N the whole
sweep runs N times over and each phase shows its median round (the burst by throughput, the
others by p99) and every round's p99. Right after each round's burst, the runtime alone runs
on that burst's rows at the batch size it ran (its best case), so that each burst's share of
it compares two measurements seconds apart, not minutes.
Prints a table, writes bench/out/e2e-<model>-<via>.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import psutil
from rich.console import Console
from rich.table import Table

from bench.common import (
    OUT,
    BrokerPauses,
    WorkerProcess,
    broker_name,
    direct_throughput,
    kafka_broker,
    listener_pid,
    ort_session,
    rows_per_second,
    scheduling,
    scratch_dir,
)
from surge.config import ModelConfig, convert, read_toml
from surge.examples import MLP_FEATURES, MLP_NAME, write_mlp
from surge.producers.load import LoadReport, run_load, shared_reply_topic
from surge.workers.runtimes.base import intra_op_threads
from tests.services import RedisServer

console = Console()
_WARM_UP_S = 15.0  # at the sweep's first rate, before the burst
# The last phase's publishers hold each request up to this long to send it with others: the
# default `linger.ms` of Kafka's own producer since 4.0, and of librdkafka's.
KAFKA_LINGER_MS = 5.0
_HALF = "½ peak"
_HALF_LINGERING = f"½ peak, {KAFKA_LINGER_MS:g} ms linger"


class Direct(Protocol):
    def __call__(
        self, path: Path, batch: int, gpu: bool, count: int, *, best_only: bool = False
    ) -> dict[str, float]:
        """Rows/s of the runtime alone at a batch size (on the GPU?) on the first `count`
        requests (the burst's): its best case first, as "best", then (unless `best_only`)
        others worth quoting, by name."""
        ...


@dataclass
class Workload:
    name: str
    write: Callable[[Path], Path]
    inputs: Callable[[int], dict[str, np.ndarray]]
    direct: Direct
    burst: int
    rates: str


def mlp() -> Workload:
    rows = np.random.default_rng(0).standard_normal((4096, 1, MLP_FEATURES)).astype(np.float32)
    return Workload(
        MLP_NAME,
        write_mlp,
        lambda i: {"x": rows[i % len(rows)]},
        lambda path, batch, gpu, count, *, best_only=False: {
            "best": direct_throughput(path, batch, threads=1, gpu=gpu)
        },
        50_000,
        "1000,2000,5000,10000,20000",
    )


def minilm() -> Workload:
    from surge.minilm import MINILM_NAME, Tokenizer, write_minilm

    tokenize = Tokenizer()
    requests = [tokenize(text) for text in _sentences(512)]

    def inputs(i: int) -> dict[str, np.ndarray]:
        return requests[i % len(requests)]

    def direct(
        path: Path, batch: int, gpu: bool, count: int, *, best_only: bool = False
    ) -> dict[str, float]:
        # The rows the burst sent, every one of them: how much a batch pads depends on which
        # rows fall together. The runtime's best case: those rows sorted by length, padded
        # least, run one at a time over every core or two at once (as the worker runs them),
        # whichever is faster. Arrival order: the batches a batcher without length bucketing
        # would form.
        sent = [inputs(i) for i in range(count)]
        by_length = sorted(sent, key=lambda r: r["input_ids"].shape[1])
        calls = (1,) if gpu else (1, 2)
        best = {"best": max(_direct_padded(path, by_length, batch, gpu, n) for n in calls)}
        if best_only:
            return best
        return best | {
            "arrival_order": max(_direct_padded(path, sent, batch, gpu, n) for n in calls)
        }

    return Workload(
        MINILM_NAME,
        write_minilm,
        inputs,
        direct,
        2_000,
        "25,50,100,150,200",
    )


def _sentences(count: int) -> list[str]:
    """Sentences of 4 to 40 words drawn from a fixed vocabulary: variable lengths, no data."""
    words = [
        "the",
        "model",
        "serves",
        "requests",
        "from",
        "kafka",
        "topics",
        "with",
        "batches",
        "of",
        "rows",
        "padded",
        "to",
        "the",
        "longest",
        "sentence",
        "while",
        "workers",
        "commit",
        "offsets",
        "and",
        "publish",
        "results",
        "to",
        "reply",
        "topics",
        "or",
        "redis",
        "under",
        "load",
        "bursts",
        "and",
        "failures",
    ]
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(words, int(rng.integers(4, 41)))) for _ in range(count)]


def _direct_padded(
    path: Path,
    requests: list[dict[str, np.ndarray]],
    batch: int,
    gpu: bool = False,
    concurrent: int = 1,
) -> float:
    """ONNX Runtime alone on these requests, `batch` at a time (the last batch takes what is
    left), each batch padded to its longest row as the worker pads; rows per second (median of
    3 passes over all batches).
    With `concurrent` > 1, that many threads take the batches in turn from one queue (as a
    worker's model instances do) and share one session, its pool sized as a worker sizes it for
    that many instances."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads(
        ModelConfig(instances=concurrent), shared_pool=True
    )
    session = ort_session(path, options, gpu=gpu)
    batches = padded_batches(requests, batch)
    session.run(None, batches[0])

    def run(inputs: dict[str, np.ndarray]) -> None:
        session.run(None, inputs)

    with ThreadPoolExecutor(concurrent) as pool:
        return rows_per_second(lambda: list(pool.map(run, batches)), len(requests))


def padded_batches(
    requests: list[dict[str, np.ndarray]], batch: int
) -> list[dict[str, np.ndarray]]:
    """The requests `batch` at a time, in order (the last batch takes what is left), each input
    padded with zeros along its second axis to the longest of its batch, as the worker pads."""
    batches = []
    for start in range(0, len(requests), batch):
        group = requests[start : start + batch]
        batches.append(
            {
                name: np.concatenate(
                    [np.pad(r[name], ((0, 0), (0, width - r[name].shape[1]))) for r in group]
                )
                for name in group[0]
                for width in [max(r[name].shape[1] for r in group)]
            }
        )
    return batches


WORKLOADS = {"mlp": mlp, "minilm": minilm}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--bootstrap", help="use this Kafka cluster instead of starting one")
    parser.add_argument("--model", choices=sorted(WORKLOADS), default="mlp")
    parser.add_argument("--via", choices=["kafka", "redis"], default="kafka")
    parser.add_argument("--burst", type=int, help="requests queued at once (model default)")
    parser.add_argument("--rates", help="offered loads, req/s (model default)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per offered load")
    parser.add_argument("--content-type", default="application/msgpack")
    parser.add_argument(
        "--rounds", type=int, default=1, help="sweeps; each phase reports its median round"
    )
    args = parser.parse_args()
    workload = WORKLOADS[args.model]()
    rates = [float(r) for r in (args.rates or workload.rates).split(",")]
    burst = args.burst or workload.burst

    model_root = scratch_dir("surge-bench-models-")
    model_path = workload.write(model_root)
    with (
        kafka_broker(args.bootstrap) as bootstrap,
        _redis(args.via) as redis_url,
        shared_reply_topic(bootstrap) as replies,  # one for every phase, as a client keeps one
    ):
        extra = {"SURGE_REDIS__URL": redis_url} if redis_url else {}
        worker = WorkerProcess(bootstrap, model_root, **extra)
        try:
            worker.first_result(workload.name, workload.inputs(0))
            load = functools.partial(
                run_load,
                bootstrap,
                workload.name,
                workload.inputs,
                content_type=args.content_type,
                via=args.via,
                redis_url=redis_url,
                reply_topic=replies,
            )
            # The broker's compilers are still busy with the paths this traffic takes (read
            # committed fetches, results, commits): left running, they would be measured.
            asyncio.run(load(count=max(1, int(rates[0] * _WARM_UP_S)), rate=rates[0]))
            broker_pid = listener_pid(bootstrap)  # None: a broker on another machine
            broker_gc = BrokerPauses(broker_pid)

            runs: dict[str, list[tuple[LoadReport, dict[str, float]]]] = {}

            def phase(
                round_number: int, name: str, count: int, rate: float | None, linger_ms: float = 0
            ) -> None:
                before, latency = worker.batch_totals(), worker.latency_buckets()
                # Started again at the first send.
                cpu = CpuShare(worker.process.pid, broker_pid)
                report = asyncio.run(
                    load(
                        count=count,
                        rate=rate,
                        linger_ms=linger_ms,
                        on_first_send=cpu.start,
                        on_last_result=cpu.stop,
                    )
                )
                stats = _batch_stats(before, worker.batch_totals())
                stats |= _worker_latency(latency, worker.latency_buckets())
                stats |= cpu.since()
                pauses = broker_gc.between(*cpu.wall)
                if pauses is not None:  # stop-the-world: every request in flight waits
                    stats |= {"broker_gc_ms": sum(pauses), "broker_gc_max_ms": max(pauses or [0])}
                runs.setdefault(name, []).append((report, stats))
                console.print(
                    f"  round {round_number}, {name}: {report.throughput:,.0f} req/s, "
                    f"p99 {report.percentile(99):.1f} ms"
                )

            # The whole sweep runs `rounds` times over (drift hits every phase alike); each
            # phase reports its median round. Every round ends at half of the first burst's
            # peak, where the latency target is set: sent as soon as due, and by publishers
            # that linger as Kafka's clients do by default (a send a tick costs the generator,
            # the broker and the worker a wake-up each), the two in turn first.
            sweep = [(f"{r:,.0f}/s", int(r * args.seconds), r) for r in rates]
            paired: list[dict[str, float]] = []
            for round_number in range(1, args.rounds + 1):
                phase(round_number, "burst", burst, None)
                paired.append(_paired(workload, model_path, burst, *runs["burst"][-1]))
                for name, count, rate in sweep:
                    phase(round_number, name, count, rate)
                half = runs["burst"][0][0].throughput / 2
                halves = [(_HALF, 0.0), (_HALF_LINGERING, KAFKA_LINGER_MS)]
                for name, linger_ms in halves if round_number % 2 else halves[::-1]:
                    phase(round_number, name, int(half * args.seconds), half, linger_ms)
            phases = [(name, *_median_round(name, done)) for name, done in runs.items()]
        finally:
            worker.stop()

    burst_batch = max(1, round(phases[0][2]["mean_rows"]))
    direct = workload.direct(model_path, burst_batch, False, burst)
    config_path = model_root / workload.name / "config.toml"
    config = convert(read_toml(config_path), ModelConfig, str(config_path))
    _report(
        f"{workload.name}-{args.via}",
        phases,
        direct,
        burst_batch,
        config.max_batch_delay_ms,
        paired,
        broker_name(args.bootstrap),
    )


def _paired(
    workload: Workload, path: Path, burst: int, report: LoadReport, stats: dict[str, float]
) -> dict[str, float]:
    """The runtime alone on the burst's rows at the batch size that burst ran, measured right
    after it (the worker and the broker idle): on a machine whose speed drifts by a third from
    one minute to the next, a share of a runtime measured minutes apart would mostly measure
    the drift."""
    batch = max(1, round(stats["mean_rows"]))
    alone = workload.direct(path, batch, False, burst, best_only=True)["best"]
    share = report.throughput / alone
    console.print(f"    runtime alone at batch {batch}: {alone:,.0f} rows/s, the burst {share:.0%}")
    return {"batch": batch, "burst": report.throughput, "alone": alone, "share": share}


def _median_round(
    name: str, runs: list[tuple[LoadReport, dict[str, float]]]
) -> tuple[LoadReport, dict[str, float]]:
    """The median round (the lower of the middle two) by throughput for the burst, by p99
    for the others, with every round's p99."""
    if name == "burst":
        ordered = sorted(runs, key=lambda run: run[0].throughput)
    else:
        ordered = sorted(runs, key=lambda run: run[0].percentile(99))
    report, stats = ordered[(len(ordered) - 1) // 2]
    return report, stats | {"p99_ms_rounds": [run[0].percentile(99) for run in runs]}


@contextmanager
def _redis(via: str) -> Iterator[str | None]:
    if via != "redis":
        yield None
        return
    with RedisServer() as server:
        yield server.url


class CpuShare:
    """Over a phase: the CPU of the worker, the broker (when it runs here) and this load
    generator with its result reader (each a share of one core), how long the worker's
    threads waited for a CPU (ms per second), and how busy the whole machine was."""

    def __init__(self, worker: int, broker: int | None) -> None:
        self._pids = {"worker": worker, "broker": broker, "generator": os.getpid()}
        self.start()

    def start(self) -> None:
        self._started = time.monotonic()
        self.wall = (time.time(), float("inf"))  # when the phase ran, by the wall clock
        self._ran = self._sample()
        self._machine = psutil.cpu_times()
        self._end: tuple[float, dict[str, tuple[float, float]], Any] | None = None

    def stop(self) -> None:
        self._end = (time.monotonic(), self._sample(), psutil.cpu_times())
        self.wall = (self.wall[0], time.time())

    def _sample(self) -> dict[str, tuple[float, float]]:
        return {name: scheduling(pid) for name, pid in self._pids.items() if pid is not None}

    def since(self) -> dict[str, float]:
        """From `start` to `stop` (the last result), or to now if it never came."""
        ended, ran, machine = self._end or (time.monotonic(), self._sample(), psutil.cpu_times())
        seconds = ended - self._started
        total = sum(machine) - sum(self._machine)
        idle = machine.idle - self._machine.idle
        shares = {
            f"{name}_cpu": (ran[name][0] - self._ran[name][0]) / seconds
            for name in ("worker", "broker", "generator")
            if name in ran
        }
        waited = ran["worker"][1] - self._ran["worker"][1]
        return shares | {
            "worker_cpu_wait_ms_per_s": waited / seconds * 1000,
            "machine_busy": 1 - idle / total if total else float("nan"),
        }


def _batch_stats(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    batches = after["batches"] - before["batches"]
    if not batches:
        return {"batches": 0, "mean_rows": 0.0, "mean_call_ms": 0.0}
    return {
        "batches": batches,
        "mean_rows": (after["rows"] - before["rows"]) / batches,
        "mean_call_ms": (after["seconds"] - before["seconds"]) / batches * 1000,
    }


def _worker_latency(
    before: dict[str, dict[float, float]], after: dict[str, dict[float, float]]
) -> dict[str, float]:
    """p99 of the worker's own histograms over a phase, as the bound of the bucket it falls
    in: how old records were when taken in, and intake to a durable result (ms)."""
    found = {}
    for name, key in (("age", "record_age_p99_ms"), ("outcome", "outcome_p99_ms")):
        counts = {b: after[name][b] - before[name].get(b, 0.0) for b in sorted(after[name])}
        total = counts.get(float("inf"), 0.0)
        bound = next((b for b, c in counts.items() if total and c >= 0.99 * total), float("nan"))
        found[key] = bound * 1000
    return found


def _report(
    label: str,
    phases: list,
    direct: dict[str, float],
    burst_batch: int,
    max_delay_ms: float,
    paired: list[dict[str, float]],
    broker: str,
) -> None:
    table = Table(title=f"Surge end to end ({label}): {broker}, one worker process")
    for column in (
        "offered",
        "throughput",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "p99 of each round",
        "result hop p99 ms",
        "record age p99 ≤ ms",
        "intake → durable p99 ≤ ms",
        "mean batch",
        "mean model call ms",
        "worker CPU",
        "worker waited for a CPU ms/s",
        "broker CPU",
        "broker GC ms (longest)",
        "generator CPU",
        "machine busy",
    ):
        table.add_column(column, justify="right")
    rows = []
    for name, report, stats in phases:
        table.add_row(
            name,
            f"{report.throughput:,.0f}/s",
            f"{report.percentile(50):.1f}",
            f"{report.percentile(99):.1f}",
            f"{report.percentile(99.9):.1f}",
            " / ".join(f"{p99:.1f}" for p99 in stats["p99_ms_rounds"]),
            f"{report.delivery_percentile(99):.1f}",
            f"{stats['record_age_p99_ms']:g}",
            f"{stats['outcome_p99_ms']:g}",
            f"{stats['mean_rows']:.1f}",
            f"{stats['mean_call_ms']:.2f}",
            f"{stats['worker_cpu']:.0%}",
            f"{stats['worker_cpu_wait_ms_per_s']:.0f}",
            f"{stats['broker_cpu']:.0%}" if "broker_cpu" in stats else "-",
            (
                f"{stats['broker_gc_ms']:.0f} ({stats['broker_gc_max_ms']:.0f})"
                if "broker_gc_ms" in stats
                else "-"
            ),
            f"{stats['generator_cpu']:.0%}",
            f"{stats['machine_busy']:.0%}",
        )
        rows.append(
            {
                "phase": name,
                "offered": report.offered_rate,
                "sent": report.sent,
                "received": report.received,
                "statuses": dict(report.statuses),
                "throughput": report.throughput,
                "p50_ms": report.percentile(50),
                "p99_ms": report.percentile(99),
                "p999_ms": report.percentile(99.9),
                "result_hop_p50_ms": report.delivery_percentile(50),
                "result_hop_p99_ms": report.delivery_percentile(99),
                **stats,
            }
        )
    console.print(table)
    for name, report, _ in phases:  # the latencies above are of the results received
        failed = report.received - report.statuses.get("ok", 0)
        if report.received < report.sent or failed:
            console.print(
                f"[red]{name}: {report.sent - report.received:,} of {report.sent:,} results "
                f"lost, {failed:,} not ok ({dict(report.statuses)})[/red]"
            )
    burst = phases[0][1].throughput
    for name, half, half_stats in phases:
        if name not in (_HALF, _HALF_LINGERING):
            continue
        target = max_delay_ms + 2 * half_stats["mean_call_ms"] + 10
        hop = (
            f"; results' own hop through the broker: p50 {half.delivery_percentile(50):.1f}, "
            f"p99 {half.delivery_percentile(99):.1f} ms"
            if len(half.delivery_ms)
            else ""
        )
        console.print(
            f"at {name} ({half.offered_rate:,.0f}/s): p99 {half.percentile(99):.1f} ms against "
            f"a target of {target:.1f} ms (max batch delay {max_delay_ms:g} + 2 × model call "
            f"{half_stats['mean_call_ms']:.2f} + 10){hop}"
        )
    console.print(
        f"ONNX Runtime alone at batch {burst_batch} (the burst's mean), and Surge's burst as "
        "a share of it: "
        + "; ".join(f"{k} {v:,.0f} rows/s, {burst / v:.0%}" for k, v in direct.items())
    )
    shares = [p["share"] for p in paired]
    console.print(
        "Each burst against the runtime alone right after it (best case, that burst's batch): "
        + " / ".join(f"{share:.0%}" for share in shares)
        + f"; median {np.median(shares):.0%}"
    )
    OUT.mkdir(exist_ok=True)
    out = OUT / f"e2e-{label}"
    out.with_suffix(".json").write_text(
        json.dumps(
            {"phases": rows, "direct": direct, "burst_batch": burst_batch, "paired": paired},
            indent=2,
        )
    )
    _plot(phases, out.with_suffix(".png"), label)


def _plot(phases: list, path: Path, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = sorted(
        (
            (r.offered_rate, r)
            for name, r, _ in phases
            if r.offered_rate and name != _HALF_LINGERING
        ),
        key=lambda pair: pair[0],
    )
    lingering = [r for name, r, _ in phases if name == _HALF_LINGERING]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    offered = [o for o, _ in sweep]
    left.plot(offered, [r.throughput for _, r in sweep], "o-", label="achieved")
    left.plot(offered, offered, "--", color="grey", label="offered")
    left.set(xlabel="offered load (req/s)", ylabel="throughput (req/s)", title=label)
    left.legend()
    for q in (50, 99, 99.9):
        right.plot(offered, [r.percentile(q) for _, r in sweep], "o-", label=f"p{q:g}")
    for report in lingering:
        right.plot(
            [report.offered_rate] * 2,
            [report.percentile(50), report.percentile(99)],
            "x",
            color="black",
            label=f"p50, p99 sent with a {KAFKA_LINGER_MS:g} ms linger",
        )
    right.set(
        xlabel="offered load (req/s)",
        ylabel="latency (ms)",
        title="End-to-end latency",
        yscale="log",
    )
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    console.print(f"wrote {path.with_suffix('.json')} and {path}")


if __name__ == "__main__":
    main()
