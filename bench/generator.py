"""What the load generator adds to the latency it measures: the same open-loop load, three
ways, interleaved against one worker on one broker.

    python -m bench.generator [--model mlp|minilm] [--rates 5000,20000,38000] [--rounds 4]

At each rate, every round runs the load (MLP or MiniLM, results to a reply topic) with the
generator's garbage collector running, with it paused while timing (as `bench.e2e` runs),
and paused with each request held up to 5 ms to go out with others, as Kafka's own producer
(since 4.0) and librdkafka hold them by default (`linger.ms`). The three swap order every
round, so the machine's drift hits them alike. The generator, its result reader, the broker
and the worker share this machine's cores: what the generator spends, and every pause it
takes while results arrive, shows in the latencies. Prints each round and each setting's
median round, writes bench/out/generator-<model>.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.common import OUT, WorkerProcess, kafka_broker, listener_pid, scratch_dir
from bench.e2e import KAFKA_LINGER_MS, WORKLOADS, CpuShare
from surge.producers.load import run_load, shared_reply_topic

console = Console()


@dataclass(frozen=True)
class Setting:
    name: str
    pause_gc: bool
    linger_ms: float


SETTINGS = (
    Setting("GC running", pause_gc=False, linger_ms=0),
    Setting("GC paused", pause_gc=True, linger_ms=0),
    Setting(f"GC paused, {KAFKA_LINGER_MS:g} ms linger", pause_gc=True, linger_ms=KAFKA_LINGER_MS),
)
Runs = dict[tuple[float, str], list[dict[str, float]]]  # by rate and setting, each round's
_FIGURES = ("p50_ms", "p99_ms", "p999_ms", "generator_cpu", "worker_cpu", "broker_cpu", "busy")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(WORKLOADS), default="mlp")
    parser.add_argument("--rates", default="5000,20000,38000", help="offered loads, req/s")
    parser.add_argument("--seconds", type=float, default=6.0, help="per run")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    workload = WORKLOADS[args.model]()
    rates = [float(r) for r in args.rates.split(",")]
    model_root = scratch_dir("surge-bench-models-")
    workload.write(model_root)
    runs: Runs = {}
    with kafka_broker(None) as bootstrap, shared_reply_topic(bootstrap) as replies:
        worker = WorkerProcess(bootstrap, model_root)
        try:
            worker.first_result(workload.name, workload.inputs(0))
            broker_pid = listener_pid(bootstrap)

            def run(rate: float, setting: Setting) -> dict[str, float]:
                cpu = CpuShare(worker.process.pid, broker_pid)
                report = asyncio.run(
                    run_load(
                        bootstrap,
                        workload.name,
                        workload.inputs,
                        count=int(rate * args.seconds),
                        rate=rate,
                        reply_topic=replies,
                        linger_ms=setting.linger_ms,
                        pause_gc=setting.pause_gc,
                        on_first_send=cpu.start,
                        on_last_result=cpu.stop,
                    )
                )
                shares = cpu.since()
                if report.received < report.sent:  # the percentiles cover only those received
                    console.print(
                        f"  [red]{setting.name} at {rate:,.0f}/s: "
                        f"{report.sent - report.received:,} results lost[/red]"
                    )
                return {
                    "p50_ms": report.percentile(50),
                    "p99_ms": report.percentile(99),
                    "p999_ms": report.percentile(99.9),
                    "throughput": report.throughput,
                    "busy": shares["machine_busy"],
                    **{k: v for k, v in shares.items() if k.endswith("_cpu")},
                }

            run(rates[0], SETTINGS[1])  # the broker's and the worker's first minutes: untimed
            for rate in rates:
                for round_number in range(1, args.rounds + 1):
                    order = SETTINGS if round_number % 2 else SETTINGS[::-1]
                    for setting in order:
                        figures = run(rate, setting)
                        runs.setdefault((rate, setting.name), []).append(figures)
                        console.print(
                            f"  {rate:,.0f}/s, round {round_number}, {setting.name}: "
                            f"p99 {figures['p99_ms']:.1f} ms, generator "
                            f"{figures['generator_cpu']:.0%} of a core"
                        )
        finally:
            worker.stop()
    _report(args.model, rates, runs)


def _report(model: str, rates: list[float], runs: Runs) -> None:
    # Each figure is the median of its own rounds (of an even number, the middle two's mean).
    table = Table(title=f"The load generator's share of the latency ({model}, medians)")
    for column in ("offered", "generator", "p50 ms", "p99 ms", "p99 of each round", "p999 ms"):
        table.add_column(column, justify="right")
    for column in ("generator CPU", "worker CPU", "broker CPU", "machine busy"):
        table.add_column(column, justify="right")
    medians: dict[tuple[float, str], dict[str, float]] = {}
    for rate in rates:
        for setting in SETTINGS:
            done = runs[(rate, setting.name)]
            # No broker CPU for a broker that is not a local process.
            median = {k: statistics.median(run.get(k, math.nan) for run in done) for k in _FIGURES}
            medians[(rate, setting.name)] = median
            table.add_row(
                f"{rate:,.0f}/s",
                setting.name,
                f"{median['p50_ms']:.1f}",
                f"{median['p99_ms']:.1f}",
                " / ".join(f"{run['p99_ms']:.1f}" for run in done),
                f"{median['p999_ms']:.1f}",
                *(f"{median[k]:.0%}" for k in _FIGURES[3:]),
            )
    console.print(table)
    OUT.mkdir(exist_ok=True)
    out = OUT / f"generator-{model}"
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "medians": {f"{r:g} {s}": v for (r, s), v in medians.items()},
                "runs": {f"{r:g} {s}": v for (r, s), v in runs.items()},
            }
        )
    )
    _plot(rates, medians, out.with_suffix(".png"), model)


def _plot(
    rates: list[float], medians: dict[tuple[float, str], dict[str, float]], path: Path, model: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for setting in SETTINGS:
        median = [medians[(rate, setting.name)] for rate in rates]
        left.plot(rates, [m["p99_ms"] for m in median], "o-", label=setting.name)
        right.plot(rates, [m["generator_cpu"] for m in median], "o-", label=setting.name)
    left.set(xlabel="offered load (req/s)", ylabel="p99 latency (ms)", title=f"{model}: p99")
    right.set(xlabel="offered load (req/s)", ylabel="share of a core", title="generator CPU")
    left.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    console.print(f"wrote {path.with_suffix('.json')} and {path}")


if __name__ == "__main__":
    main()
