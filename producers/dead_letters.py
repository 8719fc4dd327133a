"""Dead-letter tooling: summarise a dead-letter topic, and replay selected records to their
source topic once the cause is fixed, skipping requests that already have a result and
letters replayed before (each replay leaves a marker record in the dead-letter topic)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from redis.asyncio import Redis

from surge.producers.client import split_options
from surge.schemas import DecodeError, decode_request, headers, key_id

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
# A replay stopped part way (Ctrl-C) still sends what its producer holds, as it stops: this
# long at most for those records' acknowledgements and their markers.
_INTERRUPTED_SETTLE_S = 15.0


class TopicUnreadable(Exception):
    """A topic that cannot be read to its end."""


class TopicMissing(TopicUnreadable):
    """A topic that does not exist."""


@dataclass
class Record:
    """A record as read back from a topic."""

    headers: list[tuple[str, bytes]]
    key: bytes | None
    value: bytes  # b"" when read without values
    timestamp_ms: int
    partition: int
    offset: int


@dataclass
class DeadLetter:
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    timestamp_ms: int
    partition: int  # where it lies in the dead-letter topic
    offset: int
    replayed: bool = False  # a replay re-published it before (its marker is in the topic)
    # A replay re-published its request since this letter was written: from this letter, or
    # from another of the same request (dead-lettered twice, redelivered after its first
    # letter was written). A letter of that replay, failed again, is newer: not this.
    request_replayed: bool = False
    fields: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fields = {k: (v or b"").decode(errors="replace") for k, v in self.headers}

    @property
    def code(self) -> str:
        return self.fields.get(headers.ERROR_CODE, "unknown")

    @property
    def message(self) -> str | None:
        """Every `surge-error` in order: the cause first, then what was dropped to fit."""
        notes = [
            (v or b"").decode(errors="replace")
            for k, v in self.headers
            if k == headers.ERROR_MESSAGE
        ]
        return "; ".join(notes) if notes else None

    @property
    def position(self) -> bytes:
        return f"{self.partition}:{self.offset}".encode()

    @property
    def replays(self) -> int:
        """How many times its request had been replayed when this letter was written."""
        count = self.fields.get(headers.REPLAYS, "0")
        return int(count) if count.isascii() and count.isdigit() else 0  # "²" is a digit too

    @property
    def source_topic(self) -> str | None:
        return self.fields.get(headers.SOURCE_TOPIC)

    @property
    def reply_to(self) -> str | None:
        return self.fields.get(headers.REPLY_TO)

    @functools.cached_property  # the body decoded once, though asked for at every step
    def request_id(self) -> str:
        """As the worker names it: the body's id, else the key, else the source position."""
        content_type = self.fields.get(headers.CONTENT_TYPE, "application/json")
        with contextlib.suppress(DecodeError, KeyError):
            request_id = decode_request(self.value, content_type).id
            if request_id:
                return request_id
        if request_id := key_id(self.key):
            return request_id
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
    keep: Callable[[Record], bool] | None = None,
    stall_s: float = STALL_S,
) -> list[Record]:
    """Every record of a topic up to its current end, or those `keep` approves; with `values`
    false, each value is b"" (a scan for headers need not hold the bodies). Raises
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
        return await read_to_end(consumer, ends, values=values, keep=keep, stall_s=stall_s)
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
    keep: Callable[[Record], bool] | None = None,
    stall_s: float = STALL_S,
) -> list[Record]:
    """The records of the consumer's assigned partitions from their positions up to `ends`
    (those `keep` approves, when given: the others are never held together); raises
    TopicUnreadable when no partition moves for `stall_s` seconds."""
    loop = asyncio.get_running_loop()
    records = []
    remaining = {tp for tp, end in ends.items() if end > 0}
    positions = dict.fromkeys(remaining, -1)
    stalled_after = loop.time() + stall_s
    while remaining:
        for batch in (await consumer.getmany(*remaining, timeout_ms=_FETCH_MS)).values():
            read = (
                Record(
                    list(r.headers),
                    r.key,
                    (r.value or b"") if values else b"",
                    r.timestamp,
                    r.partition,
                    r.offset,
                )
                for r in batch
            )
            records.extend(read if keep is None else filter(keep, read))
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
    """The topic's dead letters, each marked if a replay re-published it before; with
    `values` false, without their bodies (each b""), which a summary does not need and which
    may be up to a message's size each."""
    records = await read_all(bootstrap, topic, options, values=values)
    replayed = {v for r in records for k, v in r.headers if k == headers.REPLAYED}
    letters = [
        DeadLetter(r.key, r.value, r.headers, r.timestamp_ms, r.partition, r.offset)
        for r in records
        if not any(k == headers.REPLAYED for k, _ in r.headers)
    ]
    for letter in letters:
        letter.replayed = letter.position in replayed
    # By request, the most replays any letter of it had when a replay re-published it: the
    # letters written before that replay (as many replays or fewer) are answered by it.
    replayed_at: dict[str, int] = {}
    for letter in letters:
        if letter.replayed:
            request_id = letter.request_id
            replayed_at[request_id] = max(replayed_at.get(request_id, 0), letter.replays)
    for letter in letters:
        replays = replayed_at.get(letter.request_id)
        letter.request_replayed = replays is not None and letter.replays <= replays
    return letters


def summarise(letters: Iterable[DeadLetter]) -> dict[str, dict[str, Any]]:
    """Per reason code: count, source topics, first and last time, one example message, and
    how many were replayed."""
    summary: dict[str, dict[str, Any]] = {}
    for letter in letters:
        entry = summary.setdefault(
            letter.code,
            {
                "count": 0,
                "sources": Counter(),
                "first_ms": letter.timestamp_ms,
                "last_ms": letter.timestamp_ms,
                "example": letter.message,
                "replayed": 0,
            },
        )
        entry["count"] += 1
        entry["replayed"] += letter.replayed
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


# A letter chosen for replay, and the headers it goes out with.
_Chosen = tuple[DeadLetter, list[tuple[str, bytes]]]


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
    replayed_before: int = 0  # its request re-published by an earlier replay (a marker says)
    # Their reply topic no longer exists (a client's own, deleted as it closed): replayed,
    # each would be computed again for nobody and come back as a new dead letter.
    reply_topic_gone: int = 0
    # Refused by Kafka (e.g. too large for the source topic), by reason: not replayed.
    refused: Counter[str] = field(default_factory=Counter)
    # Replayed, but the marker that says so was refused: a later replay may send it again.
    unmarked: int = 0

    @property
    def not_replayable(self) -> int:
        """Letters selected that could not be replayed (answered and repeated ones need not)."""
        skipped = self.unroutable + self.without_body + self.without_reply_to
        return skipped + self.reply_topic_gone + self.refused.total()


async def replay(
    bootstrap: str,
    topic: str,
    letters: list[DeadLetter],
    *,
    reply_to: str | None = None,
    redis_url: str | None = None,
    redis_prefix: str = "surge:result:",
    redis_options: Mapping[str, Any] | None = None,
    dry_run: bool = False,
    kafka_options: Mapping[str, Any] | None = None,
) -> ReplayReport:
    """Re-publish letters (read from the dead-letter `topic`) to their source topics; skip
    requests that have a result already (any result in their reply topic, an error included,
    or any value in Redis), letters of requests an earlier replay re-published (answered or
    not yet), and repeats of one request within the selection. Letters with no reply
    target, or whose reply topic no longer exists, are skipped unless `reply_to` gives one.
    The original `surge-deadline-ms` is dropped. Each letter Kafka acknowledges gets a
    marker in `topic`; one Kafka refuses is counted and the rest go on. Stopped part way
    (cancelled), a replay still marks what its producer sends as it stops."""
    common, _ = split_options(kafka_options or {})  # the producer's own: for `_publish` only
    answered, gone = await _answered(
        bootstrap, letters, reply_to, redis_url, redis_prefix, redis_options or {}, common
    )
    report = ReplayReport(len(letters), 0, 0, 0, 0)
    if not redis_url:
        targets = [reply_to or letter.reply_to for letter in letters]
        report.unverified = targets.count(headers.REPLY_TO_REDIS)
    seen: set[str] = set()
    chosen: list[_Chosen] = []
    # The most replayed letter of a request first: the one sent, and marked, is then the one
    # whose count says its siblings were replayed, whichever of them a later replay reads.
    for letter in sorted(letters, key=lambda letter: letter.replays, reverse=True):
        request_id = letter.request_id
        if request_id in answered:
            report.already_answered += 1
            continue
        if letter.request_replayed:  # answered since, or still queued behind others
            report.replayed_before += 1
            continue
        if not (reply_to or letter.reply_to):
            report.without_reply_to += 1
            continue
        if not reply_to and letter.reply_to in gone:
            report.reply_topic_gone += 1
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
        dropped = {*_ADDED, headers.DEADLINE_MS, headers.REPLAYS}
        record_headers = [(k, v) for k, v in letter.headers if k not in dropped]
        record_headers.append((headers.REPLAYS, str(letter.replays + 1).encode()))
        if reply_to:
            record_headers = [(k, v) for k, v in record_headers if k != headers.REPLY_TO]
            record_headers.append((headers.REPLY_TO, reply_to.encode()))
        chosen.append((letter, record_headers))
    if dry_run:
        report.replayed = len(chosen)
        return report
    options = {"bootstrap_servers": bootstrap, **(kafka_options or {})}
    failed = await _publish(options, topic, chosen, report, together=True)
    if failed:
        # An idempotent producer fails the batches queued behind one the broker refused
        # (out of sequence): alone, on a fresh producer, each is judged on its own.
        failed = await _publish(options, topic, [(f[0], f[1]) for f in failed], report)
    for _, _, exc in failed:
        report.refused[type(exc).__name__] += 1
    return report


async def _publish(
    options: Mapping[str, Any],
    topic: str,
    chosen: list[_Chosen],
    report: ReplayReport,
    *,
    together: bool = False,
) -> list[tuple[DeadLetter, list[tuple[str, bytes]], Exception]]:
    """Send each chosen letter to its source topic (all at once, or one after another), and
    for each that Kafka acknowledges, a marker to the dead-letter `topic`, so that a later
    replay skips it even before a worker answers it. Returns those Kafka refused."""
    producer = AIOKafkaProducer(**options, acks="all", enable_idempotence=True)
    failed: list[tuple[DeadLetter, list[tuple[str, bytes]], Exception]] = []
    markers: list[asyncio.Future[Any]] = []

    async def settle(item: _Chosen, delivery: asyncio.Future[Any]) -> None:
        letter, record_headers = item
        try:
            # Shielded: a stop part way must not cancel it, as the producer still sends it.
            await asyncio.shield(delivery)
        except KafkaError as exc:  # e.g. too large for the source topic
            failed.append((letter, record_headers, exc))
            return
        report.replayed += 1
        marker = [(headers.REPLAYED, letter.position)]
        try:
            where = {"key": letter.key, "partition": letter.partition}
            markers.append(await producer.send(topic, b"", headers=marker, **where))
        except KafkaError:  # replayed all the same: the report says a rerun may send it again
            report.unmarked += 1

    unsettled: deque[tuple[_Chosen, asyncio.Future[Any]]] = deque()  # handed to the producer

    async def settle_all() -> None:
        while unsettled:
            await settle(*unsettled[0])
            unsettled.popleft()
        for marker in markers:
            try:
                await asyncio.shield(marker)
            except KafkaError:
                report.unmarked += 1
        markers.clear()

    try:
        await producer.start()
        for letter, record_headers in chosen:
            assert letter.source_topic is not None
            try:
                delivery = await producer.send(
                    letter.source_topic, letter.value, key=letter.key, headers=record_headers
                )
            except KafkaError as exc:  # e.g. over the producer's max_request_size
                failed.append((letter, record_headers, exc))
                continue
            unsettled.append(((letter, record_headers), delivery))
            if not together:
                await settle_all()
        await settle_all()
    except asyncio.CancelledError:
        # Stopped part way: the producer sends what it holds as it stops, so each of those
        # records Kafka takes gets its marker now, or a rerun would send it again.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_INTERRUPTED_SETTLE_S):
                await settle_all()
        raise
    finally:
        await producer.stop()
    return failed


async def _answered(
    bootstrap: str,
    letters: list[DeadLetter],
    reply_to: str | None,
    redis_url: str | None,
    redis_prefix: str,
    redis_options: Mapping[str, Any],
    kafka_options: Mapping[str, Any],
) -> tuple[set[str], set[str]]:
    """Request ids among `letters` that already have a result where they would reply, or
    where they first asked to; and the reply topics among those that no longer exist."""
    targets: dict[str, set[str]] = {}
    for letter in letters:
        # Sent elsewhere now, a request may still have been answered where it first asked.
        for target in {reply_to, letter.reply_to} - {None, ""}:
            targets.setdefault(target, set()).add(letter.request_id)
    answered: set[str] = set()
    gone: set[str] = set()
    for target, ids in targets.items():
        if target == headers.REPLY_TO_REDIS:
            if redis_url:
                redis = Redis.from_url(redis_url, **redis_options)
                try:
                    ordered = sorted(ids)
                    values = await redis.mget([redis_prefix + i for i in ordered])
                    answered |= {i for i, v in zip(ordered, values, strict=True) if v is not None}
                finally:
                    await redis.aclose()
            continue

        # Any result counts, an error too, as in Redis: the request was answered, and
        # answering it again would give its caller two results. A shared reply topic may
        # hold millions of results: only those of the letters' requests are kept.
        def ours(record: Record, ids: set[str] = ids) -> bool:
            return _request_id(record) in ids

        try:
            records = await read_all(bootstrap, target, kafka_options, values=False, keep=ours)
        except TopicMissing:  # a client's own reply topic goes when the client closes
            gone.add(target)
            continue
        answered |= {_request_id(record) for record in records}
    return answered, gone


def _request_id(result: Record) -> str:
    return (dict(result.headers).get(headers.REQUEST_ID) or b"").decode(errors="replace")
