"""Dead-letter tooling: summarise a dead-letter topic, and replay selected records to their
source topic once the cause is fixed, skipping requests that already have a result."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from redis.asyncio import Redis

from surge.schemas import DecodeError, decode_request, headers

# Headers the worker adds to a dead letter: stripped again on replay.
_ADDED = {
    headers.ERROR_CODE,
    headers.ERROR_MESSAGE,
    headers.SOURCE_TOPIC,
    headers.SOURCE_PARTITION,
    headers.SOURCE_OFFSET,
}
# No progress for this long before a topic's end: a partition without a leader, or a topic
# deleted while it is read. A deadline on progress, not on the whole read: a large topic
# still reads to its end.
STALL_S = 30.0
_FETCH_MS = 500


class TopicUnreadable(Exception):
    """A topic that cannot be read to its end."""


class TopicMissing(TopicUnreadable):
    """A topic that does not exist."""


@dataclass
class DeadLetter:
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    timestamp_ms: int
    fields: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fields = {k: (v or b"").decode(errors="replace") for k, v in self.headers}

    @property
    def code(self) -> str:
        return self.fields.get(headers.ERROR_CODE, "unknown")

    @property
    def source_topic(self) -> str | None:
        return self.fields.get(headers.SOURCE_TOPIC)

    @property
    def reply_to(self) -> str | None:
        return self.fields.get(headers.REPLY_TO)

    @property
    def request_id(self) -> str:
        """As the worker names it: the body's id, else the key, else the source position."""
        content_type = self.fields.get(headers.CONTENT_TYPE, "application/json")
        with contextlib.suppress(DecodeError, KeyError):
            request_id = decode_request(self.value, content_type).id
            if request_id:
                return request_id
        if self.key:
            with contextlib.suppress(UnicodeDecodeError):
                return self.key.decode()
        return "-".join(
            self.fields.get(h, "?")
            for h in (headers.SOURCE_TOPIC, headers.SOURCE_PARTITION, headers.SOURCE_OFFSET)
        )


async def read_all(
    bootstrap: str,
    topic: str,
    kafka_options: Mapping[str, Any] | None = None,
    *,
    values: bool = True,
    stall_s: float = STALL_S,
) -> list[tuple[dict[str, str], bytes | None, bytes, int]]:
    """Every record of a topic up to its current end: (headers, key, value, timestamp); with
    `values` false, each value is b"" (a scan for headers need not hold the bodies). Raises
    TopicMissing for a topic that does not exist (without creating it), TopicUnreadable when
    no partition moves for `stall_s` seconds before the end."""
    options = {"bootstrap_servers": bootstrap, **(kafka_options or {})}
    partitions = await _partitions(options, topic)
    consumer = AIOKafkaConsumer(
        **options,
        enable_auto_commit=False,
        auto_offset_reset="earliest",  # retention moving the log start must not skip records
        isolation_level="read_committed",
    )
    try:  # a start that fails has opened connections too: stop() closes them
        await consumer.start()
        if not partitions:
            return []
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        for tp, start in (await consumer.beginning_offsets(partitions)).items():
            consumer.seek(tp, start)  # explicit: seek_to_beginning resolves lazily
        return await read_to_end(consumer, ends, values=values, stall_s=stall_s)
    finally:
        await consumer.stop()


async def _partitions(options: Mapping[str, Any], topic: str) -> list[TopicPartition]:
    """The topic's partitions, from the metadata of every topic: asked for by name, a cluster
    may create a missing topic."""
    admin = AIOKafkaAdminClient(**options)
    try:
        await admin.start()
        described = {t["topic"]: t["partitions"] for t in await admin.describe_topics()}
    finally:
        await admin.close()
    if topic not in described:
        raise TopicMissing(f"topic {topic!r} does not exist")
    return [TopicPartition(topic, p["partition"]) for p in described[topic]]


async def read_to_end(
    consumer: AIOKafkaConsumer,
    ends: Mapping[TopicPartition, int],
    *,
    values: bool = True,
    stall_s: float = STALL_S,
) -> list[tuple[dict[str, str], bytes | None, bytes, int]]:
    """The records of the consumer's assigned partitions from their positions up to `ends`;
    raises TopicUnreadable when no partition moves for `stall_s` seconds."""
    loop = asyncio.get_running_loop()
    records = []
    remaining = {tp for tp, end in ends.items() if end > 0}
    positions = dict.fromkeys(remaining, -1)
    stalled_after = loop.time() + stall_s
    while remaining:
        for batch in (await consumer.getmany(*remaining, timeout_ms=_FETCH_MS)).values():
            records.extend(
                (r.headers, r.key, r.value if values else b"", r.timestamp) for r in batch
            )
        moved = False
        for tp in list(remaining):
            position = await consumer.position(tp)
            moved |= position != positions[tp]  # a skipped transaction marker moves it too
            positions[tp] = position
            if position >= ends[tp]:
                remaining.discard(tp)
        if moved:
            stalled_after = loop.time() + stall_s
        elif remaining and loop.time() > stalled_after:
            short = ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(remaining))
            raise TopicUnreadable(f"no records for {stall_s:g} s before the end of {short}")
    return records


async def load(
    bootstrap: str, topic: str, *, values: bool = True, **options: Any
) -> list[DeadLetter]:
    """The topic's dead letters; with `values` false, without their bodies (each b""), which
    a summary does not need and which may be up to a message's size each."""
    return [
        DeadLetter(key, value or b"", list(hdrs), ts)
        for hdrs, key, value, ts in await read_all(bootstrap, topic, options, values=values)
    ]


def summarise(letters: Iterable[DeadLetter]) -> dict[str, dict[str, Any]]:
    """Per reason code: count, source topics, first and last time, one example message."""
    summary: dict[str, dict[str, Any]] = {}
    for letter in letters:
        entry = summary.setdefault(
            letter.code,
            {
                "count": 0,
                "sources": Counter(),
                "first_ms": letter.timestamp_ms,
                "last_ms": letter.timestamp_ms,
                "example": letter.fields.get(headers.ERROR_MESSAGE),
            },
        )
        entry["count"] += 1
        entry["sources"][letter.source_topic or "?"] += 1
        entry["first_ms"] = min(entry["first_ms"], letter.timestamp_ms)
        entry["last_ms"] = max(entry["last_ms"], letter.timestamp_ms)
    return summary


def select(
    letters: Iterable[DeadLetter],
    *,
    reasons: Iterable[str] = (),
    since: datetime | None = None,
    until: datetime | None = None,
    ids: Iterable[str] = (),
) -> list[DeadLetter]:
    reasons, ids = set(reasons), set(ids)
    chosen = []
    for letter in letters:
        if reasons and letter.code not in reasons:
            continue
        if since and letter.timestamp_ms < since.timestamp() * 1000:
            continue
        if until and letter.timestamp_ms > until.timestamp() * 1000:
            continue
        if ids and letter.request_id not in ids:
            continue
        chosen.append(letter)
    return chosen


@dataclass
class ReplayReport:
    selected: int
    replayed: int
    already_answered: int
    repeated: int  # the same request more than once in the selection
    unroutable: int  # no source topic recorded
    unverified: int = 0  # replying to Redis, but no Redis URL to check for results
    without_body: int = 0  # too large for the dead-letter topic: only the evidence was kept
    # No surge-reply-to and no `reply_to` given: no result to look for, so every replay
    # would run the request again.
    without_reply_to: int = 0

    @property
    def not_replayable(self) -> int:
        """Letters selected that could not be replayed (answered and repeated ones need not)."""
        return self.unroutable + self.without_body + self.without_reply_to


async def replay(
    bootstrap: str,
    letters: list[DeadLetter],
    *,
    reply_to: str | None = None,
    redis_url: str | None = None,
    redis_prefix: str = "surge:result:",
    dry_run: bool = False,
    kafka_options: Mapping[str, Any] | None = None,
) -> ReplayReport:
    """Re-publish letters to their source topics; skip requests that have a result already
    (any result in their reply topic, an error included, or any value in Redis) and repeats
    of one request within the selection. Letters with no reply target are skipped unless
    `reply_to` gives one. The original `surge-deadline-ms` is dropped."""
    answered = await _answered(
        bootstrap, letters, reply_to, redis_url, redis_prefix, kafka_options or {}
    )
    report = ReplayReport(len(letters), 0, 0, 0, 0)
    if not redis_url:
        targets = [reply_to or letter.reply_to for letter in letters]
        report.unverified = targets.count(headers.REPLY_TO_REDIS)
    seen: set[str] = set()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, **(kafka_options or {})
    )
    try:
        await producer.start()
        deliveries = []
        for letter in letters:
            request_id = letter.request_id
            if request_id in answered:
                report.already_answered += 1
                continue
            if not (reply_to or letter.reply_to):
                report.without_reply_to += 1
                continue
            if request_id in seen:
                report.repeated += 1
                continue
            if not letter.source_topic:
                report.unroutable += 1
                continue
            if not letter.value:  # replayed, an empty body would only earn a bad_encoding
                report.without_body += 1
                continue
            seen.add(request_id)
            # The original deadline has long passed: replayed, the request runs again.
            record_headers = [
                (k, v) for k, v in letter.headers if k not in _ADDED and k != headers.DEADLINE_MS
            ]
            if reply_to:
                record_headers = [(k, v) for k, v in record_headers if k != headers.REPLY_TO]
                record_headers.append((headers.REPLY_TO, reply_to.encode()))
            report.replayed += 1
            if not dry_run:
                deliveries.append(
                    await producer.send(
                        letter.source_topic, letter.value, key=letter.key, headers=record_headers
                    )
                )
        for delivery in deliveries:
            await delivery
    finally:
        await producer.stop()
    return report


async def _answered(
    bootstrap: str,
    letters: list[DeadLetter],
    reply_to: str | None,
    redis_url: str | None,
    redis_prefix: str,
    kafka_options: Mapping[str, Any],
) -> set[str]:
    """Request ids among `letters` that already have a result where they would reply, or
    where they first asked to."""
    targets: dict[str, set[str]] = {}
    for letter in letters:
        # Sent elsewhere now, a request may still have been answered where it first asked.
        for target in {reply_to, letter.reply_to} - {None, ""}:
            targets.setdefault(target, set()).add(letter.request_id)
    answered: set[str] = set()
    for target, ids in targets.items():
        if target == headers.REPLY_TO_REDIS:
            if redis_url:
                redis = Redis.from_url(redis_url)
                try:
                    ordered = sorted(ids)
                    values = await redis.mget([redis_prefix + i for i in ordered])
                    answered |= {i for i, v in zip(ordered, values, strict=True) if v is not None}
                finally:
                    await redis.aclose()
            continue
        try:
            records = await read_all(bootstrap, target, kafka_options, values=False)
        except TopicMissing:  # a client's own reply topic goes when the client closes
            continue
        for record_headers, *_ in records:
            # Any result counts, an error too, as in Redis: the request was answered, and
            # answering it again would give its caller two results.
            request_id = (dict(record_headers).get(headers.REQUEST_ID) or b"").decode()
            if request_id in ids:
                answered.add(request_id)
    return answered
