"""End-to-end throughput and latency of the example MLP through Kafka and a Surge worker.

    python -m bench.e2e [--bootstrap HOST:PORT] [--burst 50000] [--rates 1000,2000,5000,10000]

Starts Apache Kafka (unless --bootstrap), one `surge worker` process and a load generator on
this machine; measures a burst drain, then an open-loop sweep of offered loads; compares with
ONNX Runtime alone at the batch size the worker actually ran. Prints a table, writes
bench/out/e2e.json and bench/out/e2e.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.common import OUT, WorkerProcess, direct_throughput, kafka_broker
from surge.examples import MLP_FEATURES, MLP_NAME, write_mlp
from surge.producers import SurgeClient
from surge.producers.load import LoadReport, run_load

console = Console()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--bootstrap", help="use this Kafka cluster instead of starting one")
    parser.add_argument("--burst", type=int, default=50_000)
    parser.add_argument("--rates", default="1000,2000,5000,10000,20000")
    parser.add_argument("--seconds", type=float, default=5.0, help="per offered load")
    parser.add_argument("--content-type", default="application/msgpack")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]

    model_root = Path(tempfile.mkdtemp(prefix="surge-bench-models-"))
    model_path = write_mlp(model_root)
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((4096, 1, MLP_FEATURES)).astype(np.float32)

    def inputs(i: int) -> dict[str, np.ndarray]:
        return {"x": rows[i % len(rows)]}

    with kafka_broker(args.bootstrap) as bootstrap:
        worker = WorkerProcess(bootstrap, model_root)
        try:
            asyncio.run(_first_result(bootstrap, inputs(0)))
            phases: list[tuple[str, LoadReport, dict[str, float]]] = []
            for name, count, rate in [("burst", args.burst, None)] + [
                (f"{r:,.0f}/s", int(r * args.seconds), r) for r in rates
            ]:
                before = worker.batch_histogram()
                report = asyncio.run(
                    run_load(
                        bootstrap,
                        MLP_NAME,
                        inputs,
                        count=count,
                        rate=rate,
                        content_type=args.content_type,
                    )
                )
                phases.append((name, report, _batch_stats(before, worker.batch_histogram())))
                console.print(
                    f"  {name}: {report.throughput:,.0f} req/s, p99 {report.percentile(99):.1f} ms"
                )
        finally:
            worker.stop()

    burst_batch = max(1, round(phases[0][2]["mean_rows"]))
    direct = {
        "at_burst_batch": direct_throughput(model_path, burst_batch, threads=1),
        "at_max_batch": direct_throughput(model_path, 256, threads=1),
    }
    _report(phases, direct, burst_batch)


async def _first_result(bootstrap: str, inputs: dict[str, np.ndarray]) -> None:
    async with SurgeClient(bootstrap) as client:
        await client.predict(MLP_NAME, inputs, timeout=120)


def _batch_stats(before: tuple, after: tuple) -> dict[str, float]:
    bounds, counts_after, sum_after, n_after = after
    _, counts_before, sum_before, n_before = before
    batches = n_after - n_before
    per_bucket = np.diff(np.concatenate([[0], counts_after - counts_before]))
    stats = {"batches": batches, "mean_rows": (sum_after - sum_before) / batches if batches else 0}
    for bound, count in zip(bounds, per_bucket, strict=True):
        stats[f"le_{bound:g}"] = count / batches if batches else 0.0
    return stats


def _report(phases: list, direct: dict[str, float], burst_batch: int) -> None:
    table = Table(title="Surge end to end: MLP on Apache Kafka, one worker process, 2-core machine")
    for column in (
        "offered",
        "throughput",
        "p50 ms",
        "p99 ms",
        "mean batch",
        "batches ≤8 / ≤64 / >64",
    ):
        table.add_column(column, justify="right")
    rows = []
    for name, report, stats in phases:
        small = stats.get("le_8", 0)
        mid = sum(v for k, v in stats.items() if k in ("le_16", "le_32", "le_64"))
        table.add_row(
            name,
            f"{report.throughput:,.0f}/s",
            f"{report.percentile(50):.1f}",
            f"{report.percentile(99):.1f}",
            f"{stats['mean_rows']:.1f}",
            f"{small:.0%} / {mid:.0%} / {max(0.0, 1 - small - mid):.0%}",
        )
        rows.append(
            {
                "phase": name,
                "offered": report.offered_rate,
                "sent": report.sent,
                "received": report.received,
                "throughput": report.throughput,
                "p50_ms": report.percentile(50),
                "p99_ms": report.percentile(99),
                **stats,
            }
        )
    console.print(table)
    burst = phases[0][1].throughput
    console.print(
        "ONNX Runtime alone (1 thread): "
        f"{direct['at_burst_batch']:,.0f} rows/s "
        f"at batch {burst_batch} (the burst's mean), "
        f"{direct['at_max_batch']:,.0f} rows/s at batch 256"
    )
    console.print(
        f"Surge burst throughput / direct ONNX Runtime at the same batch size: "
        f"{burst / direct['at_burst_batch']:.2f}"
    )
    OUT.mkdir(exist_ok=True)
    (OUT / "e2e.json").write_text(
        json.dumps({"phases": rows, "direct": direct, "burst_batch": burst_batch}, indent=2)
    )
    _plot(phases)


def _plot(phases: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [(r.offered_rate, r) for _, r, _ in phases if r.offered_rate]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    offered = [o for o, _ in sweep]
    left.plot(offered, [r.throughput for _, r in sweep], "o-", label="achieved")
    left.plot(offered, offered, "--", color="grey", label="offered")
    left.set(xlabel="offered load (req/s)", ylabel="throughput (req/s)", title="Throughput")
    left.legend()
    right.plot(offered, [r.percentile(50) for _, r in sweep], "o-", label="p50")
    right.plot(offered, [r.percentile(99) for _, r in sweep], "o-", label="p99")
    right.set(
        xlabel="offered load (req/s)",
        ylabel="latency (ms)",
        title="End-to-end latency",
        yscale="log",
    )
    right.legend()
    fig.tight_layout()
    fig.savefig(OUT / "e2e.png", dpi=120)
    console.print(f"wrote {OUT / 'e2e.json'} and {OUT / 'e2e.png'}")


if __name__ == "__main__":
    main()
