"""Kafka writes: a record to produce and the ticket it settles (`Write`), a batch's records as
columns (`Records`), and the way they go out as record batches.

Per-message `send()` costs several times more than the model does for a small request, so
writes are grouped by target (topic, partition) and enqueued as whole record batches. Both
delivery modes use this: at-least-once from its outbox, exactly-once inside a transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    ProducerClosed,
)
from aiokafka.producer.message_accumulator import MessageAccumulator

from surge.schemas import ErrorCode, headers
from surge.workers import metrics
from surge.workers.partitioning import key_partitions
from surge.workers.record_batches import Alike
from surge.workers.tasks import within
from surge.workers.tickets import Rejection, Ticket

log = structlog.get_logger("surge.replies")

RETRY_FIRST_S = 0.05
RETRY_MAX_S = 2.0
_GIVE_UP_FACTOR = 5  # dead letters retry this many retry_s before the worker restarts
_DEAD_LETTER_HEADERS = (
    headers.ERROR_CODE,
    headers.ERROR_MESSAGE,
    headers.SOURCE_TOPIC,
    headers.SOURCE_PARTITION,
    headers.SOURCE_OFFSET,
)

Headers = list[tuple[str, bytes | None]]
# Fewer records than this go through aiokafka's builder: building alike records whole has
# fixed costs (the checks, the layout's look-up) that a few records do not pay back.
_ALIKE_FROM = 8
# The records of one enqueued record batch, and its delivery future or the error that refused it.
Sent = tuple["Records", "asyncio.Future[Any] | BaseException"]


@dataclass(slots=True)
class Write:
    """One record to produce, and the ticket it settles once acknowledged."""

    ticket: Ticket
    topic: str
    value: bytes
    headers: Headers
    dead_letter: bool
    key: bytes = b""  # none given: the ticket's own (results join by key)
    first_failure: float | None = None  # monotonic time of the first failed attempt
    retry_in: float = RETRY_FIRST_S
    # In a record batch of its own: the batch it went in was over the topic's size limit.
    alone: bool = False

    def __post_init__(self) -> None:
        if not self.key:
            self.key = self.ticket.key or self.ticket.request_id.encode()


@dataclass(slots=True, eq=False)
class Records:
    """Records to produce to one topic, as columns, and the tickets they settle.

    A batch's results travel as one of these, not as a `Write` each: per result that is a few
    list appends instead of an object, from `Replies` to the record batch. A record's headers
    are its request id's (`ids`), then `headers`, the list that a batch's results share; or,
    where `ids` has None, `headers` alone. A record that has a `Write` (a retry, a dead
    letter) keeps it in `writes`, with its attempts' state; a first attempt has None there,
    and gets a `Write` only if it fails (`write`).
    """

    topic: str
    tickets: list[Ticket] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)
    values: list[bytes] = field(default_factory=list)
    ids: list[bytes | None] = field(default_factory=list)
    headers: list[Headers] = field(default_factory=list)
    writes: list[Write | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tickets)

    def add(self, write: Write) -> None:
        self.tickets.append(write.ticket)
        self.keys.append(write.key)
        self.values.append(write.value)
        fields = write.headers
        if fields and fields[0][0] == headers.REQUEST_ID and fields[0][1] is not None:
            self.ids.append(fields[0][1])
            self.headers.append(fields[1:])
        else:
            self.ids.append(None)
            self.headers.append(fields)
        self.writes.append(write)

    def extend(self, other: Records) -> None:
        self.tickets += other.tickets
        self.keys += other.keys
        self.values += other.values
        self.ids += other.ids
        self.headers += other.headers
        self.writes += other.writes

    def pick(self, indices: list[int]) -> Records:
        """The records at these positions, in their order."""
        return self._columns(lambda column: [column[i] for i in indices])

    def part(self, start: int, end: int) -> Records:
        """The records from `start` to `end`: these very records when that is all of them."""
        if start == 0 and end == len(self.tickets):
            return self
        return self._columns(lambda column: column[start:end])

    def _columns(self, select: Callable[[list[Any]], list[Any]]) -> Records:
        """Records of this topic with `select` of each column."""
        columns = (self.tickets, self.keys, self.values, self.ids, self.headers, self.writes)
        return Records(self.topic, *map(select, columns))

    def full_headers(self, index: int) -> Headers:
        """A record's headers, its request id's first."""
        request_id = self.ids[index]
        if request_id is None:
            return self.headers[index]
        return [(headers.REQUEST_ID, request_id), *self.headers[index]]

    def write(self, index: int) -> Write:
        """The record's `Write`, made for it now if this is its first attempt."""
        write = self.writes[index]
        if write is None:
            write = self.writes[index] = Write(
                self.tickets[index],
                self.topic,
                self.values[index],
                self.full_headers(index),
                False,
                self.keys[index],
            )
        return write

    def all_writes(self) -> list[Write]:
        """Every record's `Write`, made now for first attempts: for a refused record batch."""
        return [self.write(index) for index in range(len(self.tickets))]

    def alike(self) -> Alike | None:
        """These records as `Alike`, where they are: results with keys, values and request ids
        of one length each and the same other headers (a batch's), none to go alone."""
        count = len(self.tickets)
        first = self.headers[0]
        if (
            count < _ALIKE_FROM
            or self.headers.count(first) != count
            or None in self.ids
            or not all(_one_length(column) for column in (self.keys, self.values, self.ids))
            or (self.writes.count(None) != count and any(w and w.alone for w in self.writes))
        ):
            return None
        return Alike(self.keys, self.values, headers.REQUEST_ID, self.ids, first)  # type: ignore[arg-type]


def _one_length(column: Sequence[bytes]) -> bool:
    return len(set(map(len, column))) == 1


def by_partition(
    producer: AIOKafkaProducer, items: Iterable[Write | Records]
) -> tuple[dict[tuple[str, int], Records], list[Write]]:
    """Records by the (topic, partition) Kafka's default partitioner gives their keys; writes
    to topics whose metadata this producer does not hold yet come back apart. A `Records`
    given may come back as one of those; none has records added or taken away (a first
    attempt's `Write`, made for an unknown topic, is kept in its `writes` column)."""
    cluster = producer.client.cluster
    groups: dict[tuple[str, int], Records] = {}
    unknown: list[Write] = []
    for topic, records in by_topic(items).items():
        known = cluster.partitions_for_topic(topic)
        if not known:
            unknown += records.all_writes()
            continue
        for partition, part in split_by_key(records, sorted(known)).items():
            groups[topic, partition] = part
    return groups, unknown


def by_topic(items: Iterable[Write | Records]) -> dict[str, Records]:
    """The items' records by topic, in order. A `Records` given, alone of its topic, comes
    back as it is; joined with others, into new `Records`: never changed, as exactly-once
    keeps its outcomes until their transaction commits."""
    topics: dict[str, Records] = {}
    joined: set[str] = set()  # topics whose Records were made here, free to grow
    for item in items:
        records = topics.get(item.topic)
        if records is None and isinstance(item, Records):
            topics[item.topic] = item
            continue
        if item.topic not in joined:
            joined.add(item.topic)
            new = topics[item.topic] = Records(item.topic)
            if records is not None:
                new.extend(records)
            records = new
        if isinstance(item, Records):
            records.extend(item)
        else:
            records.add(item)
    return topics


def split_by_key(records: Records, partitions: Sequence[int]) -> dict[int, Records]:
    """The records by the partition the default partitioner picks for their keys."""
    chosen = key_partitions(records.keys, partitions)
    first = chosen[0]
    if chosen.count(first) == len(chosen):  # one partition: a client's reply topic, usually
        return {first: records}
    picks: dict[int, list[int]] = {}
    for index, partition in enumerate(chosen):
        picks.setdefault(partition, []).append(index)
    return {partition: records.pick(indices) for partition, indices in picks.items()}


async def send_batches(
    producer: AIOKafkaProducer, topic: str, partition: int, records: Records
) -> list[Sent]:
    """Enqueue the records of one partition as few record batches as fit: built whole where
    they are alike (`record_batches`), else a record at a time by aiokafka's builder."""
    now_ms = int(time.time() * 1000)
    layout = _batch_layout(producer)
    alike = None if layout is None else records.alike()
    if layout is not None and alike is not None:
        batch_size, transactional = layout
        return [
            await _send_batch(producer, batch, topic, partition, records.part(start, end))
            for batch, start, end in alike.batches(batch_size, now_ms, transactional)
        ]
    sent: list[Sent] = []
    batch, start = producer.create_batch(), 0  # `start`: the first record in `batch`
    columns = zip(records.keys, records.values, records.writes, strict=True)
    for index, (key, value, write) in enumerate(columns):
        alone = write is not None and write.alone
        fields = records.full_headers(index)
        if not alone and batch.append(key=key, value=value, timestamp=now_ms, headers=fields):
            continue
        # Full, or this one goes alone: ship what is in it and start the next.
        if index > start:
            part = records.part(start, index)
            sent.append(await _send_batch(producer, batch, topic, partition, part))
            batch, start = producer.create_batch(), index
        # An empty batch takes any record; one over the broker's limit is refused there.
        batch.append(key=key, value=value, timestamp=now_ms, headers=fields)
        if alone:
            part = records.part(index, index + 1)
            sent.append(await _send_batch(producer, batch, topic, partition, part))
            batch, start = producer.create_batch(), index + 1
    if start < len(records):
        part = records.part(start, len(records))
        sent.append(await _send_batch(producer, batch, topic, partition, part))
    return sent


def _batch_layout(producer: AIOKafkaProducer) -> tuple[int, bool] | None:
    """The producer's record batch size and whether it writes in transactions; None where it
    compresses record batches, or holds no accumulator as aiokafka's does (a test's)."""
    accumulator = getattr(producer, "_message_accumulator", None)
    if not isinstance(accumulator, MessageAccumulator) or accumulator._compression_type:
        return None
    manager = accumulator._txn_manager
    return accumulator._batch_size, manager is not None and manager.transactional_id is not None


async def _send_batch(
    producer: AIOKafkaProducer, batch: Any, topic: str, partition: int, records: Records
) -> Sent:
    try:
        return records, await producer.send_batch(batch, topic, partition=partition)
    except KafkaError as exc:
        return records, exc


_SENDER_CLOSE_S = 1.0  # for a closed producer's sender to end, twice at most


async def stop_producer(producer: AIOKafkaProducer, within_s: float) -> None:
    """Stop a producer, letting it deliver what it holds for up to `within_s`; past that it is
    closed with whatever is left undelivered. With idempotence aiokafka retries a batch on a
    retriable error forever (a partition short of in-sync replicas answers one to every
    attempt), and `stop()` would wait for it as long."""
    stopping = asyncio.ensure_future(producer.stop())  # closed at its first step, even at 0 s
    if (await asyncio.wait([stopping], timeout=within_s))[0]:
        with contextlib.suppress(KafkaError):  # its writes' outcomes are handled elsewhere
            stopping.result()
        return
    stopping.cancel()
    # aiokafka (pinned) offers no public way to drop what a producer holds: end its
    # connections and its sender, then fail the batches it still holds.
    try:
        with contextlib.suppress(KafkaError):
            await producer.client.close()
        sender = producer._sender
        closing = asyncio.ensure_future(sender.close())
        if not (await asyncio.wait([closing], timeout=_SENDER_CLOSE_S))[0]:
            # A request the closed client cut off can wait for a metadata update that will
            # never come, and the sender for that request: cancelled again, it waits no more.
            sender.sender_task.cancel()
            await asyncio.wait([closing], timeout=_SENDER_CLOSE_S)
        seen(closing)  # nothing is left to do with it
    finally:
        _fail_held(producer, KafkaTimeoutError("producer closed before delivering"))


def seen(future: asyncio.Future[Any]) -> None:
    """Mark a finished future's outcome as seen, so that asyncio does not report an error
    no one retrieved; whoever awaits it still gets it. Fit for `add_done_callback`."""
    if future.done() and not future.cancelled():
        future.exception()


def _fail_held(producer: AIOKafkaProducer, exc: KafkaError) -> None:
    """Fail every batch a closed producer still holds, waking whoever waits for room behind
    them (a retriable error: a send refused so is tried again)."""
    held = producer._message_accumulator
    batches = {*itertools.chain(*held._batches.values()), *held._pending_batches}
    held._pending_batches |= batches  # a batch's callback takes it from there once it is done
    for batch in batches:
        batch.failure(exc)
        seen(batch.future)
        seen(batch._drain_waiter)


class NotAcknowledged(KafkaTimeoutError):
    """A write the cluster has not acknowledged in time (`reply_retry_s`)."""

    def __init__(self, sent_at: float) -> None:
        super().__init__(f"not acknowledged in {time.monotonic() - sent_at:.3g}s")
        self.sent_at = sent_at  # monotonic


class NoSuchTopic(KafkaError):
    retriable = False


# A topic not written to (or looked up) for this long leaves a client's metadata, as Java's
# producer forgets one after `metadata.max.idle.ms`.
METADATA_MAX_IDLE_S = 300.0


class RecentTopics:
    """The topics a Kafka client used lately: the only ones it should keep asking about.

    aiokafka's client names every topic it ever looked up in each metadata request, with
    topic creation allowed. A worker answering clients that each make a reply topic and
    delete it when done would ask about ever more topics, and on a cluster that creates
    topics on demand (Kafka's default) bring the deleted ones back at every refresh.
    """

    def __init__(self) -> None:
        self._last: dict[str, float] = {}  # monotonic time of each topic's latest use

    def __contains__(self, topic: str) -> bool:
        return topic in self._last

    def used(self, topics: Iterable[str]) -> None:
        now = time.monotonic()
        for topic in topics:
            self._last[topic] = now

    def forget_idle(self) -> set[str] | None:
        """Forget the topics not used within the idle time; those still used, or None when
        none was forgotten."""
        now = time.monotonic()
        recent = {topic for topic, at in self._last.items() if now - at < METADATA_MAX_IDLE_S}
        if len(recent) == len(self._last):
            return None
        self._last = {topic: self._last[topic] for topic in recent}
        return recent

    def forget_idle_in(
        self, clients: Iterable[AIOKafkaClient | None], keep: str
    ) -> set[str] | None:
        """`forget_idle`, and have the clients ask only about the topics still used and `keep`
        (none would mean every topic of the cluster, to aiokafka)."""
        recent = self.forget_idle()
        if recent is not None:
            for client in filter(None, clients):
                client.set_topics({*recent, keep})
        return recent


class TopicLookup:
    """Whether a topic exists, asked of a client of its own. A producer asked about a missing
    topic keeps asking, and while it does aiokafka can drop the leaders of its other topics
    from its metadata: every other result would stall behind one bad reply topic."""

    def __init__(self, client_options: dict[str, Any], wait_s: float) -> None:
        self._options = client_options
        self._wait_s = wait_s
        self._client: AIOKafkaProducer | None = None
        self._starting = asyncio.Lock()  # a burst of lookups starts one client, not one each
        self._found: set[str] = set()
        self._asked = RecentTopics()

    async def exists(self, topic: str, *, fresh: bool = False) -> bool:
        """Raises KafkaError when the cluster cannot be asked (the next call asks again).
        `fresh`: ask the cluster again about a topic found before, which may have been
        deleted since (a client's own reply topic goes with the client)."""
        self._asked.used([topic])
        if topic in self._found and not fresh:
            return True
        self._found.discard(topic)
        client = await self._started()
        if fresh:  # else the client answers from the metadata it holds
            with contextlib.suppress(TimeoutError):
                await within(client.client.force_metadata_update(), self._wait_s)
        try:  # on a cluster that auto-creates topics, this creates it
            await within(client.partitions_for(topic), self._wait_s)
        except (TimeoutError, KafkaError):
            # No such topic only if the cluster answered; unreachable, it is asked again later.
            if not await self._answers(client):
                message = f"no metadata from the cluster in {self._wait_s:g}s"
                raise KafkaTimeoutError(message) from None
            return False
        self._found.add(topic)
        return True

    async def forget_idle(self) -> None:
        """Ask no more about the topics not asked about lately (`RecentTopics`): with none
        left, the client goes (the next lookup starts another)."""
        recent = self._asked.forget_idle()
        if recent is None:
            return
        self._found &= recent
        if self._client is None:
            return
        if recent:
            self._client.client.set_topics(recent)
            return
        async with self._starting:
            client, self._client = self._client, None
        if client is not None:
            await client.stop()

    async def _started(self) -> AIOKafkaProducer:
        async with self._starting:
            if self._client is None:
                client = AIOKafkaProducer(**self._options)
                try:
                    await client.start()
                except BaseException:
                    await client.stop()  # half started, it would never learn any metadata
                    raise
                self._client = client
        return self._client

    async def _answers(self, client: AIOKafkaProducer) -> bool:
        """Whether the cluster answers a metadata request now."""
        try:
            return bool(await within(client.client.force_metadata_update(), self._wait_s))
        except TimeoutError:
            return False

    async def close(self) -> None:
        if self._client is not None:
            await self._client.stop()


def dead_letter(ticket: Ticket, rejection: Rejection, topic: str) -> Write:
    """The original bytes and headers, plus why and where they came from."""
    metrics.DEAD_LETTERS.labels(rejection.code).inc()
    log.info(
        "dead_letter",
        request_id=ticket.request_id,
        code=rejection.code,
        reason=rejection.message,
        topic=ticket.tp.topic,
        partition=ticket.tp.partition,
        offset=ticket.offset,
    )
    letter_headers = [(k, v) for k, v in ticket.headers if k not in _DEAD_LETTER_HEADERS]
    letter_headers += [
        (headers.ERROR_CODE, rejection.code.encode()),
        (headers.ERROR_MESSAGE, _cut(rejection.message, 1024)),
        (headers.SOURCE_TOPIC, ticket.tp.topic.encode()),
        (headers.SOURCE_PARTITION, str(ticket.tp.partition).encode()),
        (headers.SOURCE_OFFSET, str(ticket.offset).encode()),
    ]
    return Write(ticket, topic, ticket.value, letter_headers, dead_letter=True)


def _cut(text: str, limit: int) -> bytes:
    """`text` as UTF-8, cut to `limit` bytes at a character's end: a reader that decodes
    strictly must not fail on the evidence."""
    return text.encode()[:limit].decode(errors="ignore").encode()


def _slim(letter: Write) -> None:
    """A dead letter the topic refused as too large loses the original's value, then, if it
    is still too large, the original's headers, then its key (for the request's id): the
    evidence of what went wrong and where it came from stays (the source topic, partition
    and offset find the rest)."""
    if letter.value:
        note = f"original value of {len(letter.value)} bytes dropped: too large for the topic"
        letter.headers.append((headers.ERROR_MESSAGE, note.encode()))
        letter.value = b""
        return
    theirs = [(k, v) for k, v in letter.headers if k not in _DEAD_LETTER_HEADERS]
    if theirs:
        size = sum(len(k) + len(v or b"") for k, v in theirs)
        note = f"original headers of {size} bytes dropped: too large for the topic"
        ours = [(k, v) for k, v in letter.headers if k in _DEAD_LETTER_HEADERS]
        letter.headers = [*ours, (headers.ERROR_MESSAGE, note.encode())]
        return
    short = letter.ticket.request_id.encode()  # at most 256 characters, or the position
    if letter.key != short:
        note = f"original key of {len(letter.key)} bytes replaced by the request id"
        letter.headers.append((headers.ERROR_MESSAGE, note.encode()))
        letter.key = short


class RetryPolicy:
    """What a refused write becomes: the same write again later, or a dead letter.

    A result its reply topic refuses (or keeps refusing past `retry_s`) becomes a dead
    letter; a dead letter is retried until the dead-letter topic takes it, since dropping it
    would lose the request, and after `_GIVE_UP_FACTOR × retry_s` the worker restarts.
    """

    def __init__(
        self, dead_letter_topic: str, retry_s: float, on_crash: Callable[[BaseException], None]
    ) -> None:
        self.dead_letter_topic = dead_letter_topic
        self.retry_s = retry_s
        self._on_crash = on_crash

    def after(self, write: Write, exc: BaseException) -> Write:
        now = time.monotonic()
        if write.first_failure is None:
            # Never acknowledged: failing since it was sent.
            write.first_failure = exc.sent_at if isinstance(exc, NotAcknowledged) else now
        # Out of order (written after a batch the broker refused for good) or closed: sent by
        # a producer being replaced (`AckedWrites._renew`); the next attempt goes on the new one.
        transient = isinstance(
            exc, KafkaTimeoutError | OutOfOrderSequenceNumber | ProducerClosed
        ) or (isinstance(exc, KafkaError) and exc.retriable)
        waited = now - write.first_failure
        if not write.dead_letter and (not transient or waited >= self.retry_s):
            # The reply target refuses this result (too large, not authorised, no such topic).
            reason = f"result could not be written to {write.topic!r}: {exc!r}"
            rejection = Rejection(ErrorCode.REPLY_FAILED, reason)
            return dead_letter(write.ticket, rejection, self.dead_letter_topic)
        if write.dead_letter and waited > self.retry_s * _GIVE_UP_FACTOR:
            # The dead-letter topic itself has refused this for minutes: a restart (and a
            # redelivery of the request) beats a worker that only retries.
            self._on_crash(exc)
        if write.dead_letter and isinstance(exc, MessageSizeTooLargeError):
            _slim(write)
        metrics.REPLY_RETRIES.labels("kafka").inc()
        log.warning(
            "kafka_write_retry",
            topic=write.topic,
            error=repr(exc),
            dead_letter=write.dead_letter,
            retry_in=write.retry_in,
        )
        return write
