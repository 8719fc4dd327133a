"""The Surge path alone, in one process, without a broker: where its µs per request go.

    python -m bench.hotpath [--requests 100000] [--rounds 5] [--profile | --instructions]
                            [--aiokafka-records]

Feeds fetches of msgpack MLP requests (8 partitions, 1,024 records a fetch, each partition's
share one record batch as the broker returns it) through the worker's own path: unpack the
record batches as the worker's consumer does (`workers/fetched.py`; `--aiokafka-records`:
into aiokafka's ConsumerRecords instead, as any other consumer gets them), route, admit,
decode and validate, batch, run the model, split, encode, and build the reply record batches
with aiokafka's batch builder. Each record batch counts as acknowledged once built, which
settles its requests and moves the offsets. The network is left out: `bench.compare` and
`bench.profile` measure it. Reports the median CPU time per request (the process's, which
a busy machine's other work does not inflate as it does wall time) and that minus the model's
own; `--profile` adds a cProfile table of the top functions.

`--instructions` counts instead of timing: the machine instructions per request, path and
model, under valgrind (cachegrind). It runs the path twice, over `--requests` and over twice
as many (the same records built in both), and divides the difference in instructions by the
difference in requests, so start-up and warm-up cancel out. Unlike time, this count hardly
moves from run to run, on a busy machine too: the way to compare two versions of the code.
Both runs take about 4 minutes together, in parallel.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import pstats
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from aiokafka.consumer import fetcher
from aiokafka.consumer.fetcher import READ_COMMITTED
from aiokafka.producer.message_accumulator import BatchBuilder, MessageAccumulator
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import TopicPartition
from rich.console import Console

from bench.common import scratch_dir
from surge.config import load_settings
from surge.examples import MLP_FEATURES, write_mlp
from surge.workers.fetched import Fetched, LeanPartitionRecords, lean_records
from surge.workers.ledger import Ledger
from surge.workers.logs import configure
from surge.workers.tasks import Outbox
from surge.workers.worker import Worker, collect_young_less_often
from surge.workers.writes import Records, Write, by_topic, send_batches, split_by_key
from tests.helpers import mlp_fetch, record_batch, serving_worker

console = Console()
PARTITIONS = 8
FETCH = 1024
TOPIC = "requests"
_BATCH_BYTES = 256 * 1024  # the worker producer's max_batch_size


class RecordBatches:
    """The at-least-once sink without the network: writes grouped by the partition of their
    key and built into record batches by the worker's own `send_batches`, then settled as if
    acknowledged."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        # As the worker's producer holds one: how its record batches are to be built.
        self._message_accumulator = MessageAccumulator(None, _BATCH_BYTES, 0, 30)
        self.outbox = Outbox()
        self.bytes = 0  # of reply record batches built
        self.replies = 0

    async def run(self) -> None:
        while True:
            items: list[Write | Records] = await self.outbox.take()
            for records in by_topic(items).values():
                for partition, part in split_by_key(records, range(PARTITIONS)).items():
                    await send_batches(self, records.topic, partition, part)  # type: ignore[arg-type]
                self.replies += len(records)
                self._ledger.settle_all(records.tickets)

    def create_batch(self) -> BatchBuilder:  # as the worker's producer makes them
        return self._message_accumulator.create_builder()

    async def send_batch(self, batch: BatchBuilder, topic: str, partition: int) -> None:
        self.bytes += batch.size()


async def _assemble(model_root: Path) -> tuple[Worker, RecordBatches]:
    """A worker's serving parts, as `Worker._start` builds them, with this sink for Kafka."""
    defaults = load_settings(env={}).worker
    ledger = Ledger(defaults.max_in_flight, defaults.max_in_flight_bytes)
    sink = RecordBatches(ledger)
    return await serving_worker(model_root, TOPIC, ledger, sink.outbox.put), sink


Fetch = dict[TopicPartition, tuple[int, bytes]]  # partition -> (first offset, record batch)


def _records(count: int) -> list[Fetch]:
    """Fetches of FETCH records spread over the partitions, each partition's share one record
    batch as a broker returns it."""
    rows = np.random.default_rng(0).standard_normal((1024, 1, MLP_FEATURES)).astype(np.float32)
    per_partition = FETCH // PARTITIONS
    return [
        {
            tp: (
                offset,
                record_batch([(r.key, r.value, r.headers, r.timestamp) for r in records], offset),
            )
            for tp, records in mlp_fetch(
                TOPIC, PARTITIONS, per_partition, first_offset=offset, rows=rows
            ).items()
        }
        for offset in range(0, count // PARTITIONS, per_partition)
    ]


def _unpacked(fetch: Fetch, lean: bool) -> dict[TopicPartition, list[Any]]:
    """A fetch's records as the worker's consumer reads them (`fetched`), or as aiokafka
    makes them for any other consumer."""
    kind, marker, read = (
        (LeanPartitionRecords, lean_records, Fetched)
        if lean
        else (fetcher.PartitionRecords, None, MemoryRecords)
    )
    return {
        tp: list(kind(tp, read(data), [], first, marker, None, True, READ_COMMITTED))
        for tp, (first, data) in fetch.items()
    }


async def _drive(
    worker: Worker, sink: RecordBatches, fetches: list[Fetch], lean: bool = True
) -> float:
    """Feed every fetch as the consume loop does, pausing on a full ledger; and, where the
    worker would fetch fewer records than a whole fetch, waiting until a whole one fits (so
    max_in_flight must be at least a fetch); CPU seconds."""
    ledger = worker._ledger
    draining = asyncio.create_task(sink.run())
    started = time.process_time()
    for fetch in fetches:
        if ledger.full:
            await ledger.room()
        while ledger.room_for(FETCH, 0) < FETCH:
            await ledger.progress()
        await worker.intake(_unpacked(fetch, lean))
    await ledger.drained()
    elapsed = time.process_time() - started
    draining.cancel()
    return elapsed


async def _main(
    requests: int, rounds: int, profile: bool, lean: bool, built: int | None = None
) -> None:
    configure("warning")
    collect_young_less_often()  # as `surge worker` runs
    model_root = scratch_dir("surge-hotpath-")
    write_mlp(model_root)
    worker, sink = await _assemble(model_root)
    # Warm: the model streak, caches, the allocator.
    await _drive(worker, sink, _records(20_000), lean)
    gc.freeze()
    if built is not None:  # one of `--instructions`' runs: build `built`, serve `requests`
        await _drive(worker, sink, _records(built)[: requests // FETCH], lean)
        await worker._repository.close()
        return
    fetches = _records(requests)
    requests = len(fetches) * FETCH  # whole fetches: as many as asked for, or a few more
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    runs = [await _drive(worker, sink, fetches, lean) for _ in range(rounds)]
    elapsed = float(np.median(runs))
    if profiler:
        profiler.disable()
    served = next(iter(worker._repository.served.values()))
    model_s = _model_seconds(served.runtime, served.config.max_batch_size, requests)
    per_request = elapsed / requests * 1e6
    console.print(
        f"{requests:,} requests in {elapsed:.2f} s: {per_request:.1f} µs per request, of which "
        f"the model ≈ {model_s / requests * 1e6:.1f} µs; Surge path "
        f"{(elapsed - model_s) / requests * 1e6:.1f} µs ({sink.bytes / sink.replies:.0f} B/reply)"
    )
    await worker._repository.close()
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def _model_seconds(runtime: object, batch: int, requests: int) -> float:
    """The model's time for these requests at full batches, run directly."""
    x = np.zeros((batch, MLP_FEATURES), np.float32)
    run = runtime.run  # type: ignore[attr-defined]
    for _ in range(10):
        run({"x": x})
    started = time.process_time()
    calls = max(1, requests // batch)
    for _ in range(calls):
        run({"x": x})
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5, help="median of this many runs")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--profile", action="store_true")
    mode.add_argument("--instructions", action="store_true", help="count them (valgrind)")
    parser.add_argument(
        "--aiokafka-records",
        action="store_true",
        help="unpack fetches into aiokafka's ConsumerRecords, as any other consumer gets them",
    )
    parser.add_argument("--built", type=int, help=argparse.SUPPRESS)  # `--instructions`' runs
    args = parser.parse_args()
    if args.instructions:
        _count_instructions(args.requests, args.aiokafka_records)
        return
    lean = not args.aiokafka_records
    asyncio.run(_main(args.requests, args.rounds, args.profile, lean, args.built))


def _count_instructions(requests: int, aiokafka_records: bool) -> None:
    """Instructions per request: two runs under cachegrind, over `requests` and twice as many
    of the same records, at once; the difference over the difference."""
    requests -= requests % FETCH  # whole fetches
    counts = [requests, 2 * requests]
    outputs = [scratch_dir("surge-hotpath-cachegrind-") / f"{count}.out" for count in counts]
    runs = [
        subprocess.Popen(
            [
                *("valgrind", "--tool=cachegrind", "--cache-sim=no"),
                f"--cachegrind-out-file={output}",
                *(sys.executable, "-m", "bench.hotpath"),
                *("--requests", str(count), "--built", str(counts[-1])),
                *(["--aiokafka-records"] if aiokafka_records else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ | {"PYTHONHASHSEED": "0"},  # the same dict and set layouts each run
        )
        for count, output in zip(counts, outputs, strict=True)
    ]
    totals = []
    for run in runs:
        _, stderr = run.communicate()
        found = re.search(r"I\s+refs:\s+([\d,]+)", stderr)
        if run.returncode or not found:
            raise SystemExit(f"the run under valgrind failed:\n{stderr[-3000:]}")
        totals.append(int(found[1].replace(",", "")))
    per_request = (totals[1] - totals[0]) / (counts[1] - counts[0])
    console.print(
        f"{per_request:,.0f} instructions per request, path and model (cachegrind: "
        f"{totals[0]:,} over {counts[0]:,} requests, {totals[1]:,} over {counts[1]:,})"
    )


if __name__ == "__main__":
    main()
