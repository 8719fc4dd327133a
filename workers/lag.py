"""Consumer lag of a worker group, per request topic: what to scale workers on.

Lag in records is what Kafka's tooling (and KEDA's Kafka scaler) reads; it means different
things for a model that answers a record in 10 µs and one that takes 10 ms. The age of the
oldest record not yet committed is the same for every model: how far behind the workers are,
in time.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

_READ_S = 10.0  # to read the oldest waiting record of every partition
_FETCH_MS = 500


@dataclass(frozen=True, slots=True)
class TopicLag:
    topic: str
    partitions: int
    records: int  # end offsets minus committed offsets (the log's start where none is)
    oldest_s: float | None  # age of the oldest record not committed; None when none waits


async def group_lag(
    kafka: dict[str, Any], group: str, topics: Collection[str] | None = None
) -> list[TopicLag]:
    """The group's lag on `topics` (default: every topic it has committed offsets for)."""
    admin = AIOKafkaAdminClient(**kafka)
    consumer = AIOKafkaConsumer(**kafka, enable_auto_commit=False)
    try:
        await admin.start()
        await consumer.start()
        committed = {
            tp: meta.offset
            for tp, meta in (await admin.list_consumer_group_offsets(group)).items()
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
        positions = {tp: max(committed.get(tp, starts[tp]), starts[tp]) for tp in partitions}
        oldest = await _oldest_waiting(consumer, positions, ends)
    finally:
        await consumer.stop()
        await admin.close()
    now_ms = time.time() * 1000
    report = []
    for name in names:
        mine = [tp for tp in partitions if tp.topic == name]
        stamps = [oldest[tp] for tp in mine if tp in oldest]
        report.append(
            TopicLag(
                name,
                len(mine),
                sum(max(ends[tp] - positions[tp], 0) for tp in mine),
                max(0.0, (now_ms - min(stamps)) / 1000) if stamps else None,
            )
        )
    return report


async def _oldest_waiting(
    consumer: AIOKafkaConsumer,
    positions: dict[TopicPartition, int],
    ends: dict[TopicPartition, int],
) -> dict[TopicPartition, int]:
    """The timestamp (ms) of the record at each position that has one."""
    waiting = [tp for tp, position in positions.items() if position < ends[tp]]
    if not waiting:
        return {}
    consumer.assign(waiting)
    for tp in waiting:
        consumer.seek(tp, positions[tp])
    stamps: dict[TopicPartition, int] = {}
    deadline = time.monotonic() + _READ_S
    while len(stamps) < len(waiting) and time.monotonic() < deadline:
        for tp, records in (await consumer.getmany(timeout_ms=_FETCH_MS, max_records=1)).items():
            if records and tp not in stamps:
                consumer.pause(tp)
                if (records[0].timestamp or 0) > 0:  # v0 records carry none, some -1
                    stamps[tp] = records[0].timestamp
    return stamps
