"""At-least-once Kafka writes: drained from an outbox into one record batch per target
partition, each ticket settled once its batch is acknowledged. A refused write is retried
with back-off or becomes a dead letter (`RetryPolicy`), and so is one left unacknowledged
for `reply_retry_s`; the partitions of such writes are then written on a producer of their own
until they take one. The exactly-once counterpart is `Transactions`."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError, MessageSizeTooLargeError

from surge.workers import metrics
from surge.workers.ledger import Ledger
from surge.workers.tasks import Outbox, supervised
from surge.workers.writes import (
    RETRY_MAX_S,
    NoSuchTopic,
    NotAcknowledged,
    RecentTopics,
    Records,
    RetryPolicy,
    Sent,
    TopicLookup,
    Write,
    by_partition,
    seen,
    send_batches,
    stop_producer,
)

log = structlog.get_logger("surge.replies")

# How long the loop waits for the producer to take a pass's batches. Taken at once but for
# partitions whose earlier batch is still in flight: those wait a round trip.
_HAND_OVER_S = 0.5
_RENEW_EVERY_S = 1.0  # at most: a topic refusing every batch must not churn producers
# For the quarantine producer's writes to end when the writer closes: those it has not
# delivered by then are not settled, and their requests are consumed again.
_QUARANTINE_STOP_S = 1.0


@dataclass(slots=True)
class _Unacked:
    """A record batch enqueued and not acknowledged yet."""

    records: Records
    partition: int
    sent_at: float  # monotonic
    producer: AIOKafkaProducer


class AckedWrites:
    def __init__(
        self,
        producer: AIOKafkaProducer,
        ledger: Ledger,
        retry: RetryPolicy,
        on_crash: Callable[[BaseException], None],
        lookup: TopicLookup,
        new_producer: Callable[[], Awaitable[AIOKafkaProducer]] | None = None,
    ) -> None:
        self.producer = producer  # started by the caller, stopped after close()
        # A started producer to replace one whose partitions a refusal has broken (`_renew`).
        self._new_producer = new_producer
        self._stale = False
        self._renewed_at = 0.0
        self._lookup = lookup  # for topics the producer holds no metadata for
        self._ledger = ledger
        self._retry = retry
        self._on_crash = on_crash
        self._outbox = Outbox()
        self.put: Callable[[Write | Records], None] = self._outbox.put
        self._task: asyncio.Task[None] | None = None
        self._side_sends: set[asyncio.Task[None]] = set()
        self._handing: dict[tuple[str, int], asyncio.Task[None]] = {}  # the last, per partition
        self._sending: set[asyncio.Task[None]] = set()  # every hand-over still running
        self._topics = RecentTopics()  # written to lately
        self._unacked: dict[asyncio.Future[Any], _Unacked] = {}  # oldest first
        self._overdue_task: asyncio.Task[None] | None = None
        self._renewing = asyncio.Lock()
        # Partitions whose writes were given up on as overdue, and the producer they are
        # written on until one of their batches is acknowledged (`_release`). A partition
        # that answers every write with a retriable error slows all of its producer's writes
        # to that broker (see `_give_up_on`), and giving the shared producer up every
        # `reply_retry_s` would write the other partitions' results in flight at that moment
        # once more each time.
        self._quarantined: set[tuple[str, int]] = set()
        self._quarantine: AIOKafkaProducer | None = None  # started when first wanted
        self._quarantine_failed_at = -_RENEW_EVERY_S  # monotonic: its last start that failed
        self._opening_quarantine = asyncio.Lock()

    def start(self) -> None:
        self._task = supervised(self._loop(), "acked-writes", self._on_crash)
        self._overdue_task = supervised(self._watch_overdue(), "overdue-writes", self._on_crash)

    async def close(self) -> None:
        if self._overdue_task is not None:
            self._overdue_task.cancel()
        if self._task is not None:
            self._task.cancel()
        # Every hand-over, not only each partition's last: one chained ahead may be starting
        # the quarantine producer, which must not outlive this.
        handing = list(self._sending)
        for task in handing:
            task.cancel()
        await asyncio.gather(
            *filter(None, [self._task, self._overdue_task]),
            *self._side_sends,
            *handing,
            return_exceptions=True,
        )
        if self._quarantine is not None:
            await stop_producer(self._quarantine, _QUARANTINE_STOP_S)
        await self._lookup.close()

    async def _loop(self) -> None:
        while True:
            items: list[Write | Records] = await self._outbox.take()
            if self._stale and time.monotonic() - self._renewed_at > _RENEW_EVERY_S:
                await self._renew()
            groups, unknown = by_partition(self.producer, items)
            self._topics.used(topic for topic, _ in groups)
            for write in unknown:
                # Waiting for an unknown topic's metadata can take request_timeout_ms: do it
                # aside, so one bad reply topic never holds up everyone else's results.
                self._aside(self._look_up(write))
            # The loop waits while the producer takes the batches (its pace is what lets the
            # next take batch more), but not for long, nor for a partition still behind from
            # an earlier pass: one whose leader is gone takes nothing until its batch expires.
            waits = [task for key, group in groups.items() if (task := self._hand_over(key, group))]
            if waits:
                await asyncio.wait(waits, timeout=_HAND_OVER_S)

    async def forget_idle_topics(self) -> None:
        """Ask the cluster no more about topics not written to lately (`RecentTopics`)."""
        clients = [p.client for p in filter(None, [self.producer, self._quarantine])]
        recent = self._topics.forget_idle_in(clients, self._retry.dead_letter_topic)
        if recent is not None and self._quarantined:
            self._quarantined = {key for key in self._quarantined if key[0] in recent}
            metrics.QUARANTINED.set(len(self._quarantined))
        await self._lookup.forget_idle()

    def _aside(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._side_sends.add(task)
        task.add_done_callback(self._aside_done)

    def _aside_done(self, task: asyncio.Task[None]) -> None:
        self._side_sends.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._on_crash(exc)  # a bug: its write would never settle, unseen

    def _hand_over(self, key: tuple[str, int], records: Records) -> asyncio.Task[None] | None:
        """Send a partition's records after its earlier ones, in order; the task to wait for,
        or None when the partition is still behind."""
        behind = self._handing.get(key)
        task = asyncio.create_task(self._send(*key, records, after=behind))
        self._handing[key] = task
        self._sending.add(task)
        task.add_done_callback(functools.partial(self._handed, key))
        return None if behind else task

    def _handed(self, key: tuple[str, int], task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        if self._handing.get(key) is task:
            del self._handing[key]
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._on_crash(exc)  # a bug: refusals come back as values, not raised

    async def _send(
        self, topic: str, partition: int, records: Records, after: asyncio.Task[None] | None
    ) -> None:
        if after is not None:
            await asyncio.wait([after])  # its outcome is its own
        # Taken once: renewal may replace it while these go out.
        if (topic, partition) in self._quarantined:
            producer = await self._quarantine_producer()
        else:
            producer = self.producer
        for sent in await send_batches(producer, topic, partition, records):
            self._watch(sent, partition, producer)

    async def _quarantine_producer(self) -> AIOKafkaProducer:
        """The producer for quarantined partitions, started if there is none; the shared one
        if none can be (tried again after `_RENEW_EVERY_S`)."""
        async with self._opening_quarantine:
            failed_lately = time.monotonic() - self._quarantine_failed_at < _RENEW_EVERY_S
            if self._quarantine is None and self._new_producer is not None and not failed_lately:
                try:
                    self._quarantine = await self._new_producer()
                except KafkaError as exc:  # the cluster unreachable
                    self._quarantine_failed_at = time.monotonic()
                    log.warning("quarantine_producer_failed", error=repr(exc))
            return self._quarantine or self.producer

    async def _look_up(self, write: Write) -> None:
        """A write to a topic this producer holds no metadata for: once the topic is found
        and its metadata loaded, it goes back to the outbox and out in a record batch. Sent
        one by one instead, the first results to a new reply topic would race the record
        batches to its partitions, and aiokafka gives a batch up as timed out when it keeps
        finding another one queued there ahead of it."""
        self._topics.used([write.topic])  # kept in the producer's metadata meanwhile
        try:
            # Failed before: perhaps on a topic deleted since it was looked up.
            exists = await self._lookup.exists(write.topic, fresh=write.first_failure is not None)
            if exists:
                await self.producer.partitions_for(write.topic)
        except KafkaError as exc:  # the cluster could not be asked: retried as a refusal is
            self._failed(write, exc)
            return
        if not exists:
            self._failed(write, NoSuchTopic(f"topic {write.topic!r} does not exist"))
            return
        self.put(write)

    def _watch(self, sent: Sent, partition: int, producer: AIOKafkaProducer) -> None:
        records, delivery = sent
        if isinstance(delivery, BaseException):
            self._refused(records, delivery)
            return
        self._unacked[delivery] = _Unacked(records, partition, time.monotonic(), producer)
        delivery.add_done_callback(self._delivered)

    def _delivered(self, delivery: asyncio.Future[Any]) -> None:
        unacked = self._unacked.pop(delivery, None)
        if unacked is None:  # given up on as overdue: its records went on without it
            seen(delivery)
            return
        records = unacked.records
        exc = None if delivery.cancelled() else delivery.exception()
        if delivery.cancelled() or exc is not None:
            if isinstance(exc, KafkaError) and not exc.retriable:
                # The broker refused the batch for good: see `_renew`.
                if unacked.producer is self._quarantine:
                    self._retire_quarantine(self._retry.retry_s)
                else:
                    self._stale = True
            self._refused(records, exc or KafkaTimeoutError("delivery cancelled"))
            return
        self._settle(unacked)

    def _settle(self, unacked: _Unacked) -> None:
        records = unacked.records
        if self._quarantined:
            self._release(records.topic, unacked.partition)
        self._ledger.settle_all(records.tickets)
        metrics.outcomes_durable("kafka", (ticket.received for ticket in records.tickets))

    async def _watch_overdue(self) -> None:
        period = min(1.0, self._retry.retry_s / 10)
        while True:
            await asyncio.sleep(period)
            oldest = next(iter(self._unacked.values()), None)
            if oldest is not None and time.monotonic() - oldest.sent_at >= self._retry.retry_s:
                await self._give_up_on(oldest.producer)

    async def _give_up_on(self, producer: AIOKafkaProducer) -> None:
        """A record batch unacknowledged for `reply_retry_s`: aiokafka's idempotent producer
        retries a retriable refusal forever (a partition short of in-sync replicas answers
        one to every attempt), and it sends one request per broker at a time, so the batch
        slows every other partition of that broker too. Everything that producer holds is
        given up on: overdue writes become dead letters, the others go out again (they may
        have been written already: at least once), on a new producer if one can be made."""
        abandoned = [
            (delivery, unacked)
            for delivery, unacked in self._unacked.items()
            if unacked.producer is producer
        ]
        for delivery, _ in abandoned:
            del self._unacked[delivery]
        overdue_at = time.monotonic() - self._retry.retry_s
        overdue = {(u.records.topic, u.partition) for _, u in abandoned if u.sent_at <= overdue_at}
        topics = sorted({topic for topic, _ in overdue})
        log.warning(
            "kafka_writes_overdue",
            batches=len(abandoned),
            topics=topics,
            producer="quarantine" if producer is self._quarantine else "shared",
        )
        # Every partition of those topics: the others may be refusing too with no batch
        # overdue yet, and each found out later would cost the shared producer again. One
        # that is not goes back at its first acknowledgement.
        for topic in topics:
            partitions = producer.client.cluster.partitions_for_topic(topic) or ()
            overdue.update((topic, partition) for partition in partitions)
        self._quarantined |= overdue
        metrics.QUARANTINED.set(len(self._quarantined))
        try:
            if producer is self._quarantine:
                self._retire_quarantine(0)
            else:
                await self._renew(retiring=producer)
        finally:  # whatever happened there, the records go on
            for delivery, unacked in abandoned:
                if delivery.done() and not delivery.cancelled() and not delivery.exception():
                    self._settle(unacked)  # acknowledged while a new producer was made
                else:
                    self._refused(unacked.records, NotAcknowledged(unacked.sent_at))

    async def _renew(self, *, retiring: AIOKafkaProducer | None = None) -> None:
        """aiokafka's idempotent producer keeps the sequence numbers of a batch the broker
        refused for good (over the topic's size limit, say), so every later batch to that
        partition fails as out of order. A new producer (a new producer id) starts every
        partition afresh; the old one finishes what it has in flight (`reply_retry_s` at
        most). `retiring`: a producer whose writes were given up on, replaced if it is still
        the one in use, and closed at once."""
        async with self._renewing:  # one at a time: each retires the producer it replaces
            if retiring is not None and retiring is not self.producer:
                return  # replaced already: closed once its time to finish is up
            self._stale = False
            self._renewed_at = time.monotonic()
            if self._new_producer is None:
                return
            try:
                fresh = await self._new_producer()
            except KafkaError as exc:  # the cluster unreachable: the next refusal tries again
                log.warning("producer_renewal_failed", error=repr(exc))
                return
            retired, self.producer = self.producer, fresh
        log.info("producer_renewed")
        self._aside(stop_producer(retired, 0 if retiring is not None else self._retry.retry_s))

    def _retire_quarantine(self, within_s: float) -> None:
        """Stop the quarantine producer (a new one is started when next wanted), letting it
        deliver for `within_s`: its partitions alone are held up meanwhile."""
        assert self._quarantine is not None
        retired, self._quarantine = self._quarantine, None
        self._aside(stop_producer(retired, within_s))

    def _release(self, topic: str, partition: int) -> None:
        """A quarantined partition took a write: back to the shared producer once the
        quarantine producer holds none of its writes, so that none overtakes another."""
        key = (topic, partition)
        if key not in self._quarantined:
            return
        holding = (u for u in self._unacked.values() if u.producer is self._quarantine)
        if any((u.records.topic, u.partition) == key for u in holding):
            return
        self._quarantined.discard(key)
        metrics.QUARANTINED.set(len(self._quarantined))
        log.info("partition_released", topic=topic, partition=partition)

    def _refused(self, records: Records, exc: BaseException) -> None:
        if isinstance(exc, MessageSizeTooLargeError) and len(records) > 1:
            # The batch was over the topic's limit, not necessarily any one result in it.
            for write in records.all_writes():
                write.alone = True
                self.put(write)
            return
        for write in records.all_writes():
            self._failed(write, exc)

    def _failed(self, write: Write, exc: BaseException) -> None:
        retry = self._retry.after(write, exc)
        if retry is not write:  # a dead letter instead: no reason to wait
            self.put(retry)
            return
        asyncio.get_running_loop().call_later(write.retry_in, self.put, write)
        write.retry_in = min(write.retry_in * 2, RETRY_MAX_S)
