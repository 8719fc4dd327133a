"""Surge against hand-written peers: same broker, same model, same machine, one run.

    python -m bench.compare [--bootstrap HOST:PORT] [--requests 200000] [--faust-requests 10000]
                            [--rounds 3] [--only KIND,...] [--event-loop uvloop|asyncio]

Every contender drains its own copy of the same burst of msgpack MLP requests (queued before
it starts, keyed by request id and spread over 8 partitions by Kafka's default partitioner,
as a client's send() would) and writes one reply per request to its own reply topic.
Every contender takes up to 1,024 records per fetch. Throughput is the distinct requests
answered `ok` over the span of their reply timestamps (first to last), less those stamped in
the span's first millisecond (computed before it opened), so process start-up and model
loading are left out for everyone. Also measured, as the limits: ONNX Runtime alone at its
best batch size, and the broker with one aiokafka client doing the same work and nothing else
(drain the same burst, write each record straight back as record batches: no decode, no
model, no commits; once a round, its median reported). Contenders run in turn, `--rounds`
times over, each round in its own shuffled order (seeded: the same in every run), so that
none always follows the same one; each reports its median throughput and median CPU per
request over the rounds, and "Surge ÷ this" is the median of the ratios of the two in the
same round. CPU per request is the contender's own processes' share of a core while its
replies come in, over its throughput. The hand-written peers get the worker's collector
settings (`collect_young_less_often`, start-up frozen) and its event loop (`--event-loop`,
uvloop by default, as the worker's), so that the ratios compare designs; so does the
broker-alone client. The faust-streaming agent runs on the loop faust chooses.
Prints a table, writes bench/out/compare.json and bench/out/compare.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from rich.console import Console
from rich.table import Table

from bench.common import (
    OUT,
    WorkerProcess,
    broker_name,
    direct_throughput,
    kafka_broker,
    scratch_dir,
)
from surge.examples import MLP_FEATURES, write_mlp
from surge.producers import request_body, request_headers
from surge.producers.load import send_batches
from surge.schemas import MSGPACK
from surge.schemas.headers import STATUS
from surge.workers import fetched as lean
from surge.workers.partitioning import key_partitions
from surge.workers.worker import run_on

console = Console()
PARTITIONS = 8
_POLL_S = 0.02  # reply counts and CPU sampled this often while a contender drains


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str
    guarantees: str
    default: bool = True  # in a run without --only


CONTENDERS = [
    Contender("faust agent, one event at a time", "faust", "at-least-once"),
    Contender("getmany loop, model per request", "per-request", "auto-commit"),
    Contender("getmany loop, batched, send() per reply", "batch-send", "auto-commit"),
    Contender("getmany loop, send() per reply, await acks, commit", "alo", "at-least-once"),
    Contender("getmany loop, send_batch, await acks, commit", "alo-batch", "at-least-once"),
    Contender("getmany loop, batched, send_batch, no commits", "fast", "none"),
    Contender("Surge", "surge", "at-least-once"),
    Contender("Surge, exactly-once", "surge-eos", "exactly-once"),
    # On a 2-core machine shared with the broker a second process does not help: opt in.
    Contender("Surge, pool of 2 processes", "surge-pool", "at-least-once", default=False),
]


@dataclass
class Result:
    name: str
    kind: str
    guarantees: str
    requests: int
    answered: int
    duplicated: int
    failed: int  # replies with a status other than ok
    seconds: float
    throughput: float
    cpu_us_per_request: float  # the contender's processes, user + system, while draining


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--bootstrap", help="use this Kafka cluster instead of starting one")
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--faust-requests", type=int, default=10_000)
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs per contender, interleaved; medians reported"
    )
    parser.add_argument(
        "--only", help="comma-separated kinds, e.g. fast,surge,surge-pool (surge-pool: opt-in)"
    )
    parser.add_argument(
        "--event-loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="the event loop of Surge, of the hand-written loops and of the broker-alone client",
    )
    args = parser.parse_args()
    kinds = args.only.split(",") if args.only else [c.kind for c in CONTENDERS if c.default]
    chosen = [c for c in CONTENDERS if c.kind in kinds]

    model_root = scratch_dir("surge-bench-models-")
    model_path = write_mlp(model_root)
    rounds: dict[str, list[Result]] = {c.kind: [] for c in chosen}
    with kafka_broker(args.bootstrap) as bootstrap:
        broker_rates = []
        for round_ in range(args.rounds):  # contenders interleaved, so drift hits all alike
            # Shuffled (the same way every run): rotated, each would follow the same one. The
            # broker alone (None) takes its turn among them.
            for contender in random.Random(round_).sample([None, *chosen], len(chosen) + 1):
                if contender is None:
                    alone = _broker_alone(bootstrap, args.requests)
                    broker_rates.append(run_on(args.event_loop, alone))
                    console.print(
                        f"  round {round_ + 1}, broker alone (drain and write back, no model): "
                        f"{broker_rates[-1]:,.0f} msg/s"
                    )
                    continue
                count = args.faust_requests if contender.kind == "faust" else args.requests
                result = _run(contender, bootstrap, model_root, model_path, count, args.event_loop)
                console.print(
                    f"  round {round_ + 1}, {contender.name}: {result.throughput:,.0f} req/s, "
                    f"{result.cpu_us_per_request:.1f} µs CPU/req "
                    f"({result.answered:,}/{count:,} answered ok, {result.failed} failed, "
                    f"{result.duplicated} duplicated)"
                )
                rounds[contender.kind].append(result)
    direct = max(direct_throughput(model_path, b, threads=1) for b in (64, 128, 256, 512))
    _report(
        rounds,
        float(np.median(broker_rates)),
        direct,
        f"{broker_name(args.bootstrap)}, event loop {args.event_loop}",
    )


@dataclass
class Summary:
    """A contender over the rounds: medians, and Surge's throughput over its, round by round."""

    result: Result  # its round of median throughput (the lower middle one for an even count)
    throughput: float  # median over the rounds
    cpu_us_per_request: float
    surge_ratios: list[float]  # Surge ÷ this, in each round

    @property
    def surge_ratio(self) -> float:
        return float(np.median(self.surge_ratios)) if self.surge_ratios else float("nan")


def summarise(runs: list[Result], surge: list[Result] | None) -> Summary:
    ranked = sorted(runs, key=lambda r: r.throughput)
    ratios = []
    if surge is not None:
        pairs = zip(surge, runs, strict=True)
        ratios = [s.throughput / r.throughput for s, r in pairs if r.throughput]
    return Summary(
        ranked[(len(ranked) - 1) // 2],
        float(np.median([r.throughput for r in runs])),
        float(np.nanmedian([r.cpu_us_per_request for r in runs])),
        [x for x in ratios if np.isfinite(x)],
    )


def _run(
    contender: Contender,
    bootstrap: str,
    model_root: Path,
    model_path: Path,
    count: int,
    event_loop: str = "uvloop",
) -> Result:
    run = f"{contender.kind}.{time.time_ns()}"
    topic, replies = f"bench.{run}.requests", f"bench.{run}.replies"
    asyncio.run(_preload(bootstrap, topic, replies, count))
    stop, process = _start(contender, bootstrap, topic, replies, model_root, model_path, event_loop)
    meter = CpuMeter(process.pid)
    try:
        asyncio.run(
            _wait_for(
                bootstrap,
                replies,
                count,
                timeout=max(120.0, count / 200),
                meter=meter,
                process=process,
            )
        )
    finally:
        stop()
    try:
        stamps, answered, duplicated, failed = asyncio.run(_reply_stamps(bootstrap, replies))
    finally:
        asyncio.run(_delete_topics(bootstrap, [topic, replies]))
    seconds, throughput = span_rate(stamps, answered)
    return Result(
        contender.name,
        contender.kind,
        contender.guarantees,
        count,
        answered,
        duplicated,
        failed,
        seconds,
        throughput,
        meter.us_per_request(throughput),
    )


class CpuMeter:
    """CPU time of a process and its children per request: its share of a core while the
    replies come in (from the first sample that sees one to the first that sees them all)
    over the throughput. Counting CPU per reply seen instead would credit an exactly-once
    worker with the work done before its first transaction became visible."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self._first: tuple[float, float] | None = None  # (wall, cpu) seconds
        self._last: tuple[float, float] | None = None

    def sample(self, replies: int) -> None:
        if replies == 0:
            return
        try:
            processes = [self._process, *self._process.children(recursive=True)]
            cpu = sum(sum(p.cpu_times()[:2]) for p in processes)
        except psutil.Error:
            return
        if self._first is None:
            self._first = (time.monotonic(), cpu)
        self._last = (time.monotonic(), cpu)

    def us_per_request(self, throughput: float) -> float:
        if self._first is None or self._last is None or self._last[0] <= self._first[0]:
            return float("nan")
        share = (self._last[1] - self._first[1]) / (self._last[0] - self._first[0])
        return share / throughput * 1e6 if throughput else float("nan")


def _start(
    contender: Contender,
    bootstrap: str,
    topic: str,
    replies: str,
    model_root: Path,
    model_path: Path,
    event_loop: str,
) -> tuple[Callable[[], None], subprocess.Popen[bytes]]:
    """Start a contender; returns how to stop it and its process."""
    if contender.kind.startswith("surge"):
        delivery = "exactly_once" if contender.kind == "surge-eos" else "at_least_once"
        # Set only where it is not the default: `bench.ab` runs earlier code, without it.
        chosen = {} if event_loop == "uvloop" else {"SURGE_WORKER__EVENT_LOOP": event_loop}
        worker = WorkerProcess(
            bootstrap,
            model_root,
            processes=2 if contender.kind == "surge-pool" else 1,
            SURGE_WORKER__TOPICS=json.dumps({"mlp": topic}),
            SURGE_WORKER__DELIVERY=delivery,
            SURGE_WORKER__CREATE_TOPICS="false",
            **chosen,
        )
        return worker.stop, worker.process
    module = "bench.peers.agent" if contender.kind == "faust" else "bench.peers.loops"
    argv = [bootstrap, topic, replies, str(model_path)]
    if contender.kind != "faust":
        argv.insert(0, contender.kind)
    log = Path(tempfile.mkstemp(prefix=f"surge-bench-{contender.kind}-", suffix=".log")[1])
    process = subprocess.Popen(
        [sys.executable, "-m", module, *argv],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=os.environ | {"PYTHONUNBUFFERED": "1", "BENCH_EVENT_LOOP": event_loop},
        start_new_session=True,
    )

    def stop() -> None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)

    return stop, process


async def _preload(
    bootstrap: str, topic: str, replies: str, count: int, *, create: bool = True
) -> None:
    """The same burst for every contender: `count` msgpack requests over 8 partitions."""
    if create:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(t, PARTITIONS, 1) for t in (topic, replies)])
        finally:
            await admin.close()
    if not count:
        return
    rows = np.random.default_rng(0).standard_normal((1024, 1, MLP_FEATURES)).astype(np.float32)
    route = request_headers(model="mlp", content_type=MSGPACK, reply_to=replies)
    # Where a client's send() would put each: Kafka's default partitioner, by key.
    targets = key_partitions([f"r{i}".encode() for i in range(count)], list(range(PARTITIONS)))
    by_partition: dict[int, list[tuple[bytes, bytes, list[tuple[str, bytes]]]]] = {}
    for i, partition in enumerate(targets):
        value = request_body({"x": rows[i % len(rows)]}, f"r{i}", MSGPACK)
        by_partition.setdefault(partition, []).append((f"r{i}".encode(), value, route))
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        deliveries = []
        for partition, records in by_partition.items():
            deliveries += await send_batches(producer, topic, partition, records)
        await asyncio.gather(*deliveries)
    finally:
        await producer.stop()


async def _wait_for(
    bootstrap: str,
    topic: str,
    count: int,
    timeout: float,
    settle: float = 0.5,
    meter: CpuMeter | None = None,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """Until the reply topic holds `count` records and stops growing (its offsets count a
    transaction's commit markers too: exactly-once reaches `count` early), or the contender
    gave up or exited."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        deadline = time.monotonic() + timeout
        before = -1
        while time.monotonic() < deadline:
            written = sum((await consumer.end_offsets(partitions)).values())
            if meter is not None and written != before:  # the drain's span: idle polls not
                meter.sample(written)
            if written >= count and written == before:
                await asyncio.sleep(settle)  # exactly-once: let the last transaction commit
                return
            before = written
            if process is not None and process.poll() is not None:
                console.print(f"[red]{topic}: the contender exited ({process.returncode})")
                return
            await asyncio.sleep(_POLL_S)
        console.print(f"[red]{topic}: timed out after {timeout:.0f} s")
    finally:
        await consumer.stop()


async def _reply_stamps(
    bootstrap: str, topic: str, *, statuses: bool = True
) -> tuple[list[int], int, int, int]:
    """(timestamps of the ok replies, distinct request ids answered ok, duplicate ok replies,
    replies of another status), read_committed; without `statuses`, every record is ok."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        stamps, keys, failed = [], set(), 0
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            for records in (await consumer.getmany(timeout_ms=500, max_records=10_000)).values():
                for record in records:
                    if statuses and (STATUS, b"ok") not in record.headers:
                        failed += 1
                        continue
                    stamps.append(record.timestamp)
                    keys.add(record.key)
        return stamps, len(keys), len(stamps) - len(keys), failed
    finally:
        await consumer.stop()


async def _broker_alone(bootstrap: str, count: int) -> float:
    """The broker's rate for this work with one Python client (aiokafka, as every contender
    uses) doing nothing else: drain the same burst as every contender (queued first) and
    write each record straight back to a reply topic as record batches, with no decode, no
    model and no commits. Records per second over
    the span of the written records' timestamps, as the contenders are measured."""
    topic = f"bench.broker.{time.time_ns()}"
    replies = f"{topic}.replies"
    await _preload(bootstrap, topic, replies, count)
    lean.install()  # records as their batches hold them, as a worker reads them
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        group_id=topic,
        enable_auto_commit=False,
        key_deserializer=lean.lean_records,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks=1, linger_ms=0, max_batch_size=256 * 1024
    )
    await consumer.start()
    await producer.start()
    try:
        received, deliveries = 0, []
        while received < count:
            fetched = await consumer.getmany(timeout_ms=200, max_records=1024)
            for tp, records in fetched.items():
                back = ((r.key, r.value, r.headers) for r in records)
                deliveries += await send_batches(producer, replies, tp.partition, back)
                received += len(records)
        await asyncio.gather(*deliveries)
    finally:
        await producer.stop()
        await consumer.stop()
    try:
        stamps, _, _, _ = await _reply_stamps(bootstrap, replies, statuses=False)
    finally:
        await _delete_topics(bootstrap, [topic, replies])
    return span_rate(stamps, len(stamps))[1]


def span_rate(stamps: list[int], answered: int) -> tuple[float, float]:
    """(seconds, per second): `answered` over the span of the replies' timestamps (ms), first
    to last. The replies stamped in the span's first millisecond (a record batch's, or a
    first transaction's) were computed before it opened: they are not counted over it."""
    opens = min(stamps, default=0)
    before = sum(stamp == opens for stamp in stamps)
    seconds = (max(stamps) - opens) / 1000 if stamps else float("nan")
    return seconds, (answered - before) / seconds if answered > before and seconds > 0 else 0.0


async def _delete_topics(bootstrap: str, topics: list[str]) -> None:
    """A run's topics, once read: the next contender finds the broker as this one did."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(topics)
    finally:
        await admin.close()


def _report(
    rounds: dict[str, list[Result]], broker_rate: float, direct: float, broker: str
) -> None:
    surge = rounds.get("surge")
    summaries = [summarise(runs, surge) for runs in rounds.values()]
    table = Table(title=f"MLP, msgpack, {broker}, one process each, same machine and run")
    # End to end, a worker can go no faster than the slower of its broker and its model.
    limit = min(broker_rate, direct)
    columns = (
        "worker",
        "guarantees",
        "requests",
        "median throughput",
        "Surge ÷ this (rounds)",
        "of the limit",
        "CPU µs/req",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for summary in summaries:
        r = summary.result
        ratio = "—"
        if summary.surge_ratios:
            each = ", ".join(f"{x:.2f}" for x in summary.surge_ratios)
            ratio = f"{summary.surge_ratio:.2f}× ({each})"
        table.add_row(
            r.name,
            r.guarantees,
            f"{r.requests:,}",
            f"{summary.throughput:,.0f}/s",
            ratio,
            f"{summary.throughput / limit:.0%}",
            f"{summary.cpu_us_per_request:.1f}",
        )
    console.print(table)
    console.print(
        f"limits: broker with one aiokafka client {broker_rate:,.0f} msg/s (drain and write "
        "back, no model); "
        f"ONNX Runtime alone {direct:,.0f} rows/s (1 thread, best of batch 64–512); "
        f"end to end, the lower of the two: {limit:,.0f}/s"
    )
    OUT.mkdir(exist_ok=True)
    (OUT / "compare.json").write_text(
        json.dumps(
            {
                "results": [
                    {
                        "name": s.result.name,
                        "kind": s.result.kind,
                        "median_throughput": s.throughput,
                        "median_cpu_us_per_request": s.cpu_us_per_request,
                        "surge_ratio": s.surge_ratio,
                        "surge_ratios": s.surge_ratios,
                        "rounds": [asdict(r) for r in rounds[s.result.kind]],
                    }
                    for s in summaries
                ],
                "broker_msgs_per_s": broker_rate,
                "direct_rows_per_s": direct,
                "limit_per_s": limit,
            },
            indent=2,
        )
    )
    _plot(summaries)


def _plot(summaries: list[Summary]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(9, 4))
    names = [s.result.name for s in summaries]
    colours = ["tab:orange" if s.result.kind.startswith("surge") else "tab:grey" for s in summaries]
    axis.barh(names, [s.throughput for s in summaries], color=colours)
    axis.set(
        xlabel="requests/s (log), median over rounds", xscale="log", title="Draining the same burst"
    )
    axis.invert_yaxis()
    fig.tight_layout()
    fig.savefig(OUT / "compare.png", dpi=120)
    console.print(f"wrote {OUT / 'compare.json'} and {OUT / 'compare.png'}")


if __name__ == "__main__":
    main()
