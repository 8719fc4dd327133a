"""Consumer lag of a worker group, per request topic: what to scale workers on.

Lag in records is what Kafka's tooling (and KEDA's Kafka scaler) reads; it means different
things for a model that answers a record in 10 µs and one that takes 10 ms. The age of the
oldest record not yet committed is the same for every model: how far behind the workers are,
in time.

Records are read as the workers read them (read_committed): up to the last stable offset,
skipping aborted records. A partition read to that end without a record has nothing waiting
(its offsets past the committed one were transaction markers and aborted records).

A partition the group has committed nothing on, or whose committed offset the log no longer
holds (lost to retention), starts where the group resets to: it waits from the log's start
(`earliest`), or not at all (`latest`: it starts at the end).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import CoordinatorLoadInProgressError, CoordinatorNotAvailableError

from surge.config import TOPIC_NAME, WorkerSettings

_READ_S = 10.0  # to read the oldest waiting record of every partition
_FETCH_MS = 500
# A cluster's group coordinator takes a moment to come up (a fresh cluster, a failover).
_COORDINATOR_WAIT_S = 10.0
_TOPIC = re.compile(TOPIC_NAME)

Reset = Literal["earliest", "latest"]


@dataclass(frozen=True, slots=True)
class TopicLag:
    topic: str
    partitions: int
    # Last stable offsets minus committed offsets (where none is: see the reset policy): with
    # transactional producers, their markers and aborted records count among them.
    records: int
    oldest_s: float | None  # age of the oldest record not committed; None if none waits
    # A waiting partition's oldest record could not be read in time (oldest_s is None then).
    age_unknown: bool = False
    uncommitted: int = 0  # partitions the group has committed nothing on


@dataclass(frozen=True, slots=True)
class _PartitionLag:
    records: int  # 0: nothing waits
    stamp: int | None  # ms, of the oldest waiting record; None if not read
    uncommitted: bool


def configured_topics(worker: WorkerSettings) -> list[str]:
    """The request topics the settings name: `topics`, `shared_topics`, and `topic_prefix` +
    each model in `models` (or found in `model_root`). A topic whose model no worker serves
    yet is included: a backlog waits there all the same."""
    names = worker.models or _model_dirs(Path(worker.model_root))
    topics = {worker.topics.get(name, worker.topic_prefix + name) for name in names}
    topics |= {*worker.topics.values(), *worker.shared_topics}
    return sorted(t for t in topics if _TOPIC.fullmatch(t))


def _model_dirs(root: Path) -> list[str]:
    try:  # a root the worker would not find either leaves only the named topics
        return sorted(p.name for p in root.iterdir() if p.is_dir())
    except OSError:
        return []


async def group_lag(
    kafka: dict[str, Any],
    group: str,
    topics: Collection[str] | None = None,
    *,
    configured: Collection[str] = (),
    reset: Reset = "earliest",
    read_s: float = _READ_S,
) -> list[TopicLag]:
    """The group's lag on `topics` (default: every topic it has committed offsets for, and
    those of `configured` that exist; none if there are none). `reset` is the group's
    `auto_offset_reset`: where it starts a partition without a committed offset the log
    holds. The oldest waiting records are read for up to `read_s` seconds."""
    admin = AIOKafkaAdminClient(**kafka)
    consumer = AIOKafkaConsumer(
        **kafka,
        enable_auto_commit=False,
        isolation_level="read_committed",
        # Retention moving the log start past a position between finding it and reading
        # there resets it as the group would reset: aiokafka's default, the end, shows none.
        auto_offset_reset=reset,
    )
    # The log ends, past open transactions: a group may have committed up to there.
    watermarks = AIOKafkaConsumer(**kafka, enable_auto_commit=False)
    try:
        await admin.start()
        await consumer.start()
        await watermarks.start()
        committed = {
            tp: meta.offset
            for tp, meta in (await _group_offsets(admin, group)).items()
            if meta.offset >= 0
        }
        # Every topic's metadata: asked for by name, a cluster may create a missing topic.
        existing = {t["topic"]: t["partitions"] for t in await admin.describe_topics()}
        if topics is None:
            topics = {tp.topic for tp in committed} | (existing.keys() & set(configured))
        names = sorted(topics)
        partitions = [
            TopicPartition(name, p["partition"])
            for name in names
            for p in sorted(existing.get(name, ()), key=lambda p: p["partition"])
        ]
        lags = await _partition_lags(consumer, watermarks, partitions, committed, reset, read_s)
    finally:
        await watermarks.stop()
        await consumer.stop()
        await admin.close()
    now_ms = time.time() * 1000
    return [
        _topic_lag(name, [lag for tp, lag in lags.items() if tp.topic == name], now_ms)
        for name in names
    ]


async def _group_offsets(admin: AIOKafkaAdminClient, group: str) -> dict[TopicPartition, Any]:
    deadline = time.monotonic() + _COORDINATOR_WAIT_S
    while True:
        try:
            return await admin.list_consumer_group_offsets(group)
        except (CoordinatorNotAvailableError, CoordinatorLoadInProgressError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _partition_lags(
    consumer: AIOKafkaConsumer,
    watermarks: AIOKafkaConsumer,
    partitions: list[TopicPartition],
    committed: dict[TopicPartition, int],
    reset: Reset,
    read_s: float,
) -> dict[TopicPartition, _PartitionLag]:
    if not partitions:
        return {}
    ends = await consumer.end_offsets(partitions)  # last stable offsets, read_committed
    highs = await watermarks.end_offsets(partitions)  # log ends, open transactions included
    firsts = await consumer.beginning_offsets(partitions)
    positions = {
        tp: _start(committed.get(tp), firsts[tp], ends[tp], highs[tp], reset) for tp in partitions
    }
    stamps, drained = await _oldest_waiting(consumer, positions, ends, read_s)
    return {
        tp: _PartitionLag(
            0 if tp in drained else max(0, ends[tp] - positions[tp]),
            stamps.get(tp),
            tp not in committed,
        )
        for tp in partitions
    }


def _start(committed: int | None, first: int, end: int, high: int, reset: Reset) -> int:
    """Where the group's consumer reads a partition from: its committed offset while the log
    holds it (up to its high watermark: past the last stable offset `end`, it waits for a
    transaction to end), else where it resets to (as it does on an out-of-range offset: before
    the log's start, or past its end after the log lost records)."""
    if committed is not None and first <= committed <= high:
        return committed
    return end if reset == "latest" else first


def _topic_lag(topic: str, partitions: list[_PartitionLag], now_ms: float) -> TopicLag:
    waiting = [lag for lag in partitions if lag.records]
    # A partition whose oldest record was not read would only make the age look smaller.
    unknown = any(lag.stamp is None for lag in waiting)
    oldest = min((lag.stamp for lag in waiting if lag.stamp is not None), default=None)
    return TopicLag(
        topic,
        len(partitions),
        sum(lag.records for lag in waiting),
        max(0.0, (now_ms - oldest) / 1000) if oldest is not None and not unknown else None,
        age_unknown=unknown,
        uncommitted=sum(lag.uncommitted for lag in partitions),
    )


async def _oldest_waiting(
    consumer: AIOKafkaConsumer,
    positions: dict[TopicPartition, int],
    ends: dict[TopicPartition, int],
    read_s: float,
) -> tuple[dict[TopicPartition, int], set[TopicPartition]]:
    """The timestamp (ms) of the first record from each position, for those read within
    `read_s` that carry one; and the partitions read to their end without a record."""
    unread = {tp for tp, position in positions.items() if position < ends[tp]}
    if not unread:
        return {}, set()
    consumer.assign(list(unread))
    for tp in unread:
        consumer.seek(tp, positions[tp])
    stamps: dict[TopicPartition, int] = {}
    drained: set[TopicPartition] = set()
    deadline = time.monotonic() + read_s
    while unread and time.monotonic() < deadline:
        fetched = await consumer.getmany(timeout_ms=_FETCH_MS, max_records=1)
        for tp, records in fetched.items():
            if records and tp in unread:
                unread.discard(tp)
                consumer.pause(tp)
                if (records[0].timestamp or 0) > 0:  # v0 records carry none, some -1
                    stamps[tp] = records[0].timestamp
        # Skipped markers and aborted records move the position without returning a record.
        for tp in [tp for tp in unread if await consumer.position(tp) >= ends[tp]]:
            unread.discard(tp)
            consumer.pause(tp)
            drained.add(tp)
    return stamps, drained
