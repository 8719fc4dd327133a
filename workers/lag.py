"""Consumer lag of a worker group, per request topic: what to scale workers on.

Lag in records is what Kafka's tooling (and KEDA's Kafka scaler) reads; it means different
things for a model that answers a record in 10 µs and one that takes 10 ms. The age of the
oldest record not yet committed is the same for every model: how far behind the workers are,
in time.

A partition the group has committed nothing on waits from the log's start when the group
resets to `earliest`, and not at all when it resets to `latest` (it starts at the end).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import CoordinatorLoadInProgressError, CoordinatorNotAvailableError

_READ_S = 10.0  # to read the oldest waiting record of every partition
_FETCH_MS = 500
# A cluster's group coordinator takes a moment to come up (a fresh cluster, a failover).
_COORDINATOR_WAIT_S = 10.0


@dataclass(frozen=True, slots=True)
class TopicLag:
    topic: str
    partitions: int
    records: int  # end offsets minus committed offsets (where none is: see the reset policy)
    oldest_s: float | None  # age of the oldest record not committed; None if none waits
    # A waiting partition's oldest record could not be read in time (oldest_s is None then).
    age_unknown: bool = False
    uncommitted: int = 0  # partitions the group has committed nothing on


async def _group_offsets(admin: AIOKafkaAdminClient, group: str) -> dict[TopicPartition, Any]:
    deadline = time.monotonic() + _COORDINATOR_WAIT_S
    while True:
        try:
            return await admin.list_consumer_group_offsets(group)
        except (CoordinatorNotAvailableError, CoordinatorLoadInProgressError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def group_lag(
    kafka: dict[str, Any],
    group: str,
    topics: Collection[str] | None = None,
    *,
    reset: Literal["earliest", "latest"] = "earliest",
    read_s: float = _READ_S,
) -> list[TopicLag]:
    """The group's lag on `topics` (default: every topic it has committed offsets for; none
    when it has committed nothing). `reset` is the group's `auto_offset_reset`: where it
    starts a partition it has committed nothing on. The oldest waiting records are read for
    up to `read_s` seconds."""
    admin = AIOKafkaAdminClient(**kafka)
    consumer = AIOKafkaConsumer(**kafka, enable_auto_commit=False)
    try:
        await admin.start()
        await consumer.start()
        committed = {
            tp: meta.offset
            for tp, meta in (await _group_offsets(admin, group)).items()
            if meta.offset >= 0
        }
        names = sorted(topics if topics is not None else {tp.topic for tp in committed})
        # Every topic's metadata: asked for by name, a cluster may create a missing topic.
        existing = {t["topic"]: t["partitions"] for t in await admin.describe_topics()}
        partitions = [
            TopicPartition(name, p["partition"])
            for name in names
            for p in sorted(existing.get(name, ()), key=lambda p: p["partition"])
        ]
        if not partitions:
            return [TopicLag(name, 0, 0, None) for name in names]
        ends = await consumer.end_offsets(partitions)
        starts = await consumer.beginning_offsets(partitions)
        unset = ends if reset == "latest" else starts  # where an uncommitted partition starts
        positions = {tp: max(committed.get(tp, unset[tp]), starts[tp]) for tp in partitions}
        oldest = await _oldest_waiting(consumer, positions, ends, read_s)
    finally:
        await consumer.stop()
        await admin.close()
    now_ms = time.time() * 1000
    report = []
    for name in names:
        mine = [tp for tp in partitions if tp.topic == name]
        waiting = [tp for tp in mine if positions[tp] < ends[tp]]
        # A partition whose oldest record was not read would only make the age look smaller.
        unknown = any(tp not in oldest for tp in waiting)
        stamps = [oldest[tp] for tp in waiting if tp in oldest]
        report.append(
            TopicLag(
                name,
                len(mine),
                sum(ends[tp] - positions[tp] for tp in waiting),
                max(0.0, (now_ms - min(stamps)) / 1000) if stamps and not unknown else None,
                age_unknown=unknown,
                uncommitted=sum(tp not in committed for tp in mine),
            )
        )
    return report


async def _oldest_waiting(
    consumer: AIOKafkaConsumer,
    positions: dict[TopicPartition, int],
    ends: dict[TopicPartition, int],
    read_s: float,
) -> dict[TopicPartition, int]:
    """The timestamp (ms) of the record at each position that has one, read within `read_s`."""
    waiting = [tp for tp, position in positions.items() if position < ends[tp]]
    if not waiting:
        return {}
    consumer.assign(waiting)
    for tp in waiting:
        consumer.seek(tp, positions[tp])
    stamps: dict[TopicPartition, int] = {}
    deadline = time.monotonic() + read_s
    while len(stamps) < len(waiting) and time.monotonic() < deadline:
        for tp, records in (await consumer.getmany(timeout_ms=_FETCH_MS, max_records=1)).items():
            if records and tp not in stamps:
                consumer.pause(tp)
                if (records[0].timestamp or 0) > 0:  # v0 records carry none, some -1
                    stamps[tp] = records[0].timestamp
    return stamps
