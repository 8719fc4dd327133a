"""Exactly-once: each input partition's results and consumed offset committed in one Kafka
transaction.

Every assigned input partition gets its own transactional producer, with the id
`<group>:<topic>:<partition>` (`transactional_id`). Whoever owns the partition next
initialises the same id, which aborts what the previous owner left open and fences it: a
worker that lost the partition without noticing (a zombie) can commit nothing more. aiokafka's
`send_offsets_to_transaction` carries no group generation (KIP-447), so this per-partition id
is what fences.

A transaction carries exactly the outcomes of the offsets it commits, those below the
partition's settled prefix. Outcomes finished out of order wait for a later transaction, so a
record redelivered after a crash never meets a committed result of itself. A batch's results
wait as columns (`Records`), one per input partition, as at-least-once writes them: a `Write`
is made only for a result that is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    InvalidTopicError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    ProducerFenced,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    UnknownTopicOrPartitionError,
)

from surge.workers import metrics
from surge.workers.ledger import Ledger
from surge.workers.tasks import within
from surge.workers.tickets import Ticket
from surge.workers.writes import (
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

log = structlog.get_logger("surge.transactions")

# Outcomes waiting for their input partition's transaction: one, or a batch's (`Records`).
Outcomes = Write | Records

_METADATA_WAIT_S = 2.0  # a reply topic without metadata by then fails this round, not the loop
_CLOSE_S = 10.0
_ACK_MARGIN_S = 1.0  # of a transaction's send limit, left for giving up on what it sent
_ROUND_S = 5.0  # a commit round waits no longer for its transactions (`Transactions.commit`)
# A revoked partition's transaction still running is waited for this long, then abandoned: one
# that wrote to a partition refusing every write can end only when that partition recovers.
_DROP_WAIT_S = 2.0


# Refusals of a record by its target (retried, then dead-lettered by the retry policy).
_RECORD_ERRORS = (
    NoSuchTopic,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    InvalidTopicError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)


def transactional_id(group_id: str, tp: TopicPartition) -> str:
    """A partition's id, distinct for every group, topic and partition: a topic's name holds
    no colon, so the id read from the right gives each part back, whatever the group's name."""
    return f"{group_id}:{tp.topic}:{tp.partition}"


def _former_id(group_id: str, tp: TopicPartition) -> str:
    """The id Surge 0.1 gave a partition, fenced too as a partition is taken, so that a worker
    of that version still holding it (in a rolling upgrade) commits nothing more. Two groups
    could share such an id (`a` reading topic `b.c`, and `a.b` reading `c`) and fence each
    other's workers for good; this is why the id changed."""
    return f"{group_id}.{tp.topic}.{tp.partition}"


async def _fence_in(producer: AIOKafkaProducer) -> None:
    """Start a transactional producer and wait for its producer id: the broker has then
    fenced the id's previous holder and aborted its open transaction."""
    await producer.start()
    # An empty transaction waits for the producer id.
    await producer.begin_transaction()
    await producer.abort_transaction()


class _Partition:
    """One input partition: its producer and the outcomes waiting for a transaction."""

    __slots__ = (
        "committed",
        "fenced",
        "lock",
        "producer",
        "started",
        "topics",
        "uncertain",
        "writes",
    )

    def __init__(self) -> None:
        self.lock = asyncio.Lock()  # one transaction at a time; revocation waits for it
        self.producer: AIOKafkaProducer | None = None
        self.writes: list[Outcomes] = []
        self.fenced = False  # another owner took the transactional id: commit nothing more
        # The position of a commit sent without an answer: whether it took is read back
        # once the producer is fenced in again (which lets that commit finish or abort it).
        self.uncertain: int | None = None
        self.started = False  # a producer was fenced in for this ownership once already
        self.committed: int | None = None  # the group's offset as this owner last knew it
        self.topics = RecentTopics()  # its producer wrote to lately


class Transactions:
    def __init__(
        self,
        group_id: str,
        ledger: Ledger,
        retry: RetryPolicy,
        producer_options: dict[str, Any],
        on_crash: Callable[[BaseException], None],
        committed: Callable[[TopicPartition], Awaitable[int | None]],
    ) -> None:
        self._group_id = group_id
        self._on_crash = on_crash
        self._committed = committed  # the group's committed offset of a partition
        self._ledger = ledger
        self._retry = retry
        self._options = producer_options
        request_timeout_s = producer_options.get("request_timeout_ms", 30_000) / 1000
        self._send_limit_s = request_timeout_s + 5
        # How long a transaction waits for its writes to be acknowledged: within the send limit.
        self._ack_wait_s = min(retry.retry_s, request_timeout_s)
        self._partitions: dict[TopicPartition, _Partition] = {}
        self._running: dict[TopicPartition, asyncio.Task[bool]] = {}  # the latest transactions
        self._began: dict[TopicPartition, float] = {}  # when each of those started (loop time)
        self._lookup = TopicLookup(producer_options, _METADATA_WAIT_S)

    def buffer(self, outcomes: Outcomes) -> None:
        """Hold outcomes for their input partitions' next transactions; their offsets may now
        commit. A batch's `Records` may hold several input partitions': each gets its part."""
        if isinstance(outcomes, Write):
            self._hold(outcomes, [outcomes.ticket])
            return
        if not outcomes.tickets:
            return
        for part in _by_ownership(outcomes):
            self._hold(part, part.tickets)

    def _hold(self, outcomes: Outcomes, tickets: list[Ticket]) -> None:
        """`tickets`: the outcomes', all of one partition's ownership (`Ticket.tracking`)."""
        state = self._partitions.get(tickets[0].tp)
        if state is None or state.fenced or not self._ledger.current(tickets[0]):
            # Revoked since it was read (perhaps assigned again): whoever owns the partition
            # now reads the records again. Committing these outcomes would answer them twice.
            self._ledger.settle_all(tickets)
            return
        state.writes.append(outcomes)
        self._ledger.finish_all(tickets)

    async def assign(
        self, partitions: Iterable[TopicPartition]
    ) -> dict[TopicPartition, int | None]:
        """Take over partitions: initialising their transactional ids now aborts what a dead
        previous owner left open, which unblocks `read_committed` readers at once. Returns
        each partition's committed offset as read once fenced in: where to consume from."""
        partitions = list(partitions)
        new = []
        for tp in partitions:
            if tp not in self._partitions or self._partitions[tp].fenced:
                self._partitions[tp] = _Partition()
                new.append(tp)
        results = await asyncio.gather(
            *(self._start(tp, self._partitions[tp]) for tp in new), return_exceptions=True
        )
        for tp, result in zip(new, results, strict=True):
            if isinstance(result, BaseException):  # not fenced: the caller must not consume
                log.error("transactional_producer_failed", partition=str(tp), error=repr(result))
                raise result
        return {tp: self._partitions[tp].committed for tp in partitions}

    async def commit(self, positions: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        """One transaction per partition, concurrently; returns the positions committed.

        A transaction that wrote to a partition refusing every write (one short of in-sync
        replicas) can be neither committed nor aborted until that partition recovers: Kafka
        writes the transaction's markers there. Its input partition waits, and the others go
        on: a round waits `_ROUND_S` at most, and skips partitions whose transaction from an
        earlier round is still running. A transaction that ends after its round is reported
        by a later one (its offset is committed again, in an empty transaction)."""
        started: dict[TopicPartition, asyncio.Task[bool]] = {}
        for tp, position in positions.items():
            running = self._running.get(tp)
            if running is None or running.done():
                task = asyncio.create_task(self._commit(tp, position))
                task.add_done_callback(self._bug_check)
                started[tp] = self._running[tp] = task
                self._began[tp] = asyncio.get_running_loop().time()
        if started:
            await asyncio.wait(started.values(), timeout=_ROUND_S)
        return {
            tp: positions[tp]
            for tp, task in started.items()
            # One that raised (`_bug_check`) or was abandoned (`_drop`) committed nothing.
            if task.done() and not task.cancelled() and not task.exception() and task.result()
        }

    def _bug_check(self, task: asyncio.Task[bool]) -> None:
        """A transaction raised (a bug: it handles the failures it expects): the worker
        restarts, as for any background task's, also when it ended after its round."""
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("transaction_crashed", error=repr(exc))
            self._on_crash(exc)

    @property
    def overdue(self) -> set[TopicPartition]:
        """Input partitions whose transaction has outlived its round and still runs (one that
        wrote to a partition refusing every write waits for that partition): the worker stops
        fetching them, or the outcomes they would hold meanwhile, counted in flight until
        committed, would fill its bounds and stop every other partition too."""
        late = asyncio.get_running_loop().time() - _ROUND_S
        return {
            tp
            for tp, task in self._running.items()
            if not task.done() and self._began.get(tp, late) <= late
        }

    async def revoke(self, partitions: Iterable[TopicPartition]) -> None:
        """Give partitions up: drop what was not committed (the next owner redoes it)."""
        await asyncio.gather(*(self._drop(tp) for tp in list(partitions)))

    async def close(self) -> None:
        await self.revoke(list(self._partitions))
        await self._lookup.close()

    async def forget_idle_topics(self) -> None:
        """Ask the cluster no more about topics not written to lately (`RecentTopics`)."""
        for state in list(self._partitions.values()):
            client = state.producer.client if state.producer is not None else None
            state.topics.forget_idle_in([client], self._retry.dead_letter_topic)
        await self._lookup.forget_idle()

    # -- one partition --------------------------------------------------------------------

    async def _commit(self, tp: TopicPartition, position: int) -> bool:
        """A task of its own, so never cancelled half-way (a shutdown cancelling the commit
        loop): a transaction whose commit went out but whose writes were kept would send
        them again. Only a partition leaving cancels it (`_drop`), its writes with it."""
        state = self._partitions.get(tp)
        if state is None:
            return False
        return await self._transaction(tp, state, position)

    async def _transaction(self, tp: TopicPartition, state: _Partition, position: int) -> bool:
        async with state.lock:
            if self._partitions.get(tp) is not state or state.fenced:
                return False
            try:
                producer = await self._producer(tp, state)
                if state.uncertain is not None:
                    await self._read_back(tp, state)
                writes, later = _split_at(state.writes, position)
                state.writes = writes + later  # the same outcomes, a batch cut at `position`
                state.topics.used({w.topic for w in writes})
                await producer.begin_transaction()
                # Bounded: with idempotence aiokafka retries a stuck batch forever. Until the
                # commit is sent, giving up is safe (the next producer aborts the rest).
                give_up_at = asyncio.get_running_loop().time() + self._send_limit_s
                async with asyncio.timeout_at(give_up_at):
                    failures = await self._produce(producer, writes, give_up_at - _ACK_MARGIN_S)
                    if failures:
                        self._refused(state, failures)
                        if any(isinstance(exc, NotAcknowledged) for _, exc in failures):
                            # The producer would go on retrying those inside the next
                            # transaction: a new one aborts this transaction instead.
                            await self._stop(state, at_once=True)
                        else:
                            await producer.abort_transaction()
                        return False
                    await producer.send_offsets_to_transaction({tp: position}, self._group_id)
                state.uncertain = position
                # Bounded too: a coordinator that never answers would hold this partition's
                # lock for good. Given up on, the commit's outcome is unknown, which
                # `_read_back` settles on the next round, as for an answer lost.
                await within(producer.commit_transaction(), self._send_limit_s)
                state.uncertain, state.committed = None, position
            except ProducerFenced as exc:
                # Another owner initialised this id (we are a zombie), or the transaction
                # outlived transaction_timeout_ms: commit nothing more, and restart so the
                # group settles who owns the partition.
                log.error("partition_fenced", partition=str(tp))
                state.fenced = True
                self._release(state.writes)
                state.writes = []
                await self._stop(state)
                self._on_crash(exc)
                return False
            except Exception as exc:  # aiokafka's state machine raises AssertionError too
                # Broker gone, coordinator moving: start this partition's producer afresh
                # (initialising it again aborts the open transaction) and retry next round.
                log.warning("transaction_failed", partition=str(tp), error=repr(exc))
                await self._stop(state)
                return False
            committed = set(map(id, writes))
            state.writes = [w for w in state.writes if id(w) not in committed]
            self._release(writes)
            metrics.outcomes_durable("kafka", (t.received for w in writes for t in _tickets(w)))
            return True

    async def _read_back(self, tp: TopicPartition, state: _Partition) -> None:
        """Did the commit whose answer was lost take? The group's offset says: if it did,
        its results are out, and sending them again would show them twice."""
        assert state.uncertain is not None
        committed = state.committed  # read as its producer, just restarted, was fenced in
        if committed is not None and committed >= state.uncertain:
            took, state.writes = _split_at(state.writes, state.uncertain)
            self._release(took)
            log.info("lost_commit_answer_took", partition=str(tp), results=_count(took))
        state.uncertain = None

    async def _produce(
        self, producer: AIOKafkaProducer, writes: list[Outcomes], acks_by: float
    ) -> list[tuple[Write, BaseException]]:
        """Send the writes inside the open transaction; the ones that failed, and why.
        `acks_by`: the latest event-loop time to wait for acknowledgements until."""
        failures: list[tuple[Write, BaseException]] = []
        groups, unknown = by_partition(producer, writes)
        # Looked up together: one after another, each missing topic's wait would add up, and
        # twenty of them outlast the transaction's time limit, round after round.
        topics = list({w.topic for w in unknown})
        found = await asyncio.gather(*(self._has_topic(producer, t) for t in topics))
        for topic in (t for t, exists in zip(topics, found, strict=True) if not exists):
            # Dead-letter these results now rather than hold every other result of this
            # partition back for reply_retry_s.
            error = NoSuchTopic(f"no metadata for reply topic {topic!r}")
            failures += [(w, error) for w in unknown if w.topic == topic]
        if failures:
            return failures
        if unknown:  # their topics' metadata has arrived: group everything again
            groups, unknown = by_partition(producer, writes)
        if unknown:  # metadata lost meanwhile: this round fails, none are dropped
            return [(w, KafkaTimeoutError(w.topic)) for w in unknown]
        sent_at = time.monotonic()
        sent: list[Sent] = []
        for batches in await asyncio.gather(
            *(send_batches(producer, *key, group) for key, group in groups.items())
        ):
            sent += batches
        # A record batch the cluster does not acknowledge in time is a failure of its records,
        # retried and then dead-lettered as in at-least-once: never failing, it would hold
        # every later result of this partition back.
        pending = [delivery for _, delivery in sent if not isinstance(delivery, BaseException)]
        if pending:
            wait_s = min(self._ack_wait_s, acks_by - asyncio.get_running_loop().time())
            await asyncio.wait(pending, timeout=max(wait_s, 0))
        for members, delivery in sent:
            if not isinstance(delivery, BaseException):
                if not delivery.done():
                    delivery.add_done_callback(seen)  # failed when its producer stops
                    delivery = NotAcknowledged(sent_at)
                elif delivery.cancelled():
                    delivery = KafkaTimeoutError("delivery cancelled")
                elif (exc := delivery.exception()) is None:
                    continue
                else:
                    delivery = exc
            batch = members.all_writes()  # a retry's own Write; made now for a first attempt
            if isinstance(delivery, MessageSizeTooLargeError) and len(batch) > 1:
                # The batch was over the topic's limit, not necessarily any one result in it:
                # in the next transaction each goes in a batch of its own.
                for write in batch:
                    write.alone = True
                delivery = KafkaTimeoutError(f"a batch of {len(batch)} over the size limit")
            failures += [(w, delivery) for w in batch]
        return failures

    async def _has_topic(self, producer: AIOKafkaProducer, topic: str) -> bool:
        """Whether a topic this producer holds no metadata for exists, looked up aside first:
        asked about a missing topic, the producer would lose its other topics' leaders."""
        if not await self._lookup.exists(topic):
            return False
        try:
            await within(producer.partitions_for(topic), _METADATA_WAIT_S)
        except (TimeoutError, KafkaError):
            return False
        return True

    def _refused(self, state: _Partition, failures: list[tuple[Write, BaseException]]) -> None:
        """Put each refused write's next attempt (itself, or its dead letter) in its place, a
        batch holding one becoming a `Write` each. Errors of the producer or the transaction,
        not of a record, raise instead: the producer is started afresh and the same writes
        are tried again."""
        for _, exc in failures:
            if not isinstance(exc, _RECORD_ERRORS):
                raise exc
        # By ticket: a first attempt's `Write` was made for the refused batch, not kept here.
        replacing = {id(write.ticket): self._retry.after(write, exc) for write, exc in failures}
        writes: list[Outcomes] = []
        for outcomes in state.writes:
            if isinstance(outcomes, Records) and any(id(t) in replacing for t in outcomes.tickets):
                writes += (replacing.get(id(w.ticket), w) for w in outcomes.all_writes())
            elif isinstance(outcomes, Write):
                writes.append(replacing.get(id(outcomes.ticket), outcomes))
            else:
                writes.append(outcomes)
        state.writes = writes

    async def _start(self, tp: TopicPartition, state: _Partition) -> None:
        async with state.lock:
            await self._producer(tp, state)

    async def _producer(self, tp: TopicPartition, state: _Partition) -> AIOKafkaProducer:
        """The partition's producer, started and fenced in (call holding the lock).

        Started again while this worker still holds the partition (its producer lost to a
        failed transaction), it fences whoever initialised the id since: if that was a new
        owner, which has committed the partition's offsets meanwhile, this worker is the
        zombie (aiokafka's offset commits carry no group generation to refuse it by) and
        commits nothing more. A new owner that has committed already is found before the id
        is taken: taking it would fence that owner too, and restart it for nothing."""
        if state.producer is None:
            if state.started:
                _check_owner(tp, state, await self._committed(tp), fenced_in=False)
            producer = AIOKafkaProducer(
                **self._options, transactional_id=transactional_id(self._group_id, tp)
            )
            try:
                await _fence_in(producer)
                if not state.started:
                    await self._fence_former(tp)
                committed = await self._committed(tp)  # no one else can move it from now on
                if state.started:  # a new owner may have committed as the id was taken
                    _check_owner(tp, state, committed, fenced_in=True)
            except BaseException as exc:
                given_up = isinstance(exc, asyncio.CancelledError)  # revoked while fencing in
                with contextlib.suppress(Exception):
                    await stop_producer(producer, 0 if given_up else _CLOSE_S)
                raise
            state.started, state.committed = True, committed
            state.producer = producer
        return state.producer

    async def _fence_former(self, tp: TopicPartition) -> None:
        former = _former_id(self._group_id, tp)
        producer = AIOKafkaProducer(**self._options, transactional_id=former)
        try:
            await _fence_in(producer)
        except TransactionalIdAuthorizationFailed:
            # A cluster whose ACLs grant only the new ids ran no 0.1 worker that needs it.
            log.info("former_id_not_fenced", partition=str(tp), transactional_id=former)
        finally:
            with contextlib.suppress(Exception):
                await stop_producer(producer, _CLOSE_S)

    async def _drop(self, tp: TopicPartition) -> None:
        state = self._partitions.get(tp)
        if state is None:
            return
        abandoned = await self._abandon_if_stuck(tp)
        async with state.lock:
            if self._partitions.get(tp) is state:
                del self._partitions[tp]
                self._running.pop(tp, None)
                self._began.pop(tp, None)
            self._release(state.writes)
            state.writes = []
            await self._stop(state, at_once=abandoned)

    async def _abandon_if_stuck(self, tp: TopicPartition) -> bool:
        """Cancel the partition's transaction if it does not end within `_DROP_WAIT_S`, and
        say whether it was. Waiting longer would hold the rebalance, and the group would evict
        this worker; and the next owner can fence the id in only once the transaction ends
        anyway. Whatever it sent is that owner's to settle: a commit sent takes effect, the
        rest is aborted as the id is taken. Nothing of it is sent again from here: the
        partition's writes leave with it."""
        running = self._running.get(tp)
        if running is None or (await asyncio.wait([running], timeout=_DROP_WAIT_S))[0]:
            return False
        running.cancel()
        log.warning("transaction_abandoned", partition=str(tp))
        await asyncio.wait([running])  # its producer, given up on, stops at once
        return True

    async def _stop(self, state: _Partition, *, at_once: bool = False) -> None:
        """Stop the partition's producer: `at_once`, without waiting for what it holds."""
        producer, state.producer = state.producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await stop_producer(producer, 0 if at_once else _CLOSE_S)

    def _release(self, writes: list[Outcomes]) -> None:
        self._ledger.release_all([t for w in writes for t in _tickets(w)])


def _tickets(outcomes: Outcomes) -> list[Ticket]:
    return outcomes.tickets if isinstance(outcomes, Records) else [outcomes.ticket]


def _count(outcomes: list[Outcomes]) -> int:
    return sum(len(o) if isinstance(o, Records) else 1 for o in outcomes)


def _by_ownership(records: Records) -> list[Records]:
    """The records by their tickets' partition ownership (`Ticket.tracking`), which is one
    input partition's, in order: a batch's results, of all the partitions it drew from."""
    tokens = [ticket.tracking for ticket in records.tickets]
    if tokens.count(tokens[0]) == len(tokens):  # tokens are compared by identity
        return [records]
    picks: dict[int, list[int]] = {}
    for index, token in enumerate(tokens):
        picks.setdefault(id(token), []).append(index)
    return [records.pick(indices) for indices in picks.values()]


def _split_at(outcomes: list[Outcomes], position: int) -> tuple[list[Outcomes], list[Outcomes]]:
    """The outcomes of offsets below `position`, and the others; a batch holding both is cut
    in two."""
    below: list[Outcomes] = []
    rest: list[Outcomes] = []
    for item in outcomes:
        if isinstance(item, Write):
            (below if item.ticket.offset < position else rest).append(item)
            continue
        offsets = [ticket.offset for ticket in item.tickets]
        if max(offsets) < position:
            below.append(item)
        elif min(offsets) >= position:
            rest.append(item)
        else:
            below.append(item.pick([i for i, o in enumerate(offsets) if o < position]))
            rest.append(item.pick([i for i, o in enumerate(offsets) if o >= position]))
    return below, rest


def _check_owner(
    tp: TopicPartition, state: _Partition, committed: int | None, *, fenced_in: bool
) -> None:
    """Raise, as fenced, where the partition's committed offset tells of another owner.
    Fenced in, the read is current: any offset this worker did not write tells. Read before
    the id is taken, it may lag this worker's own last commit (whose markers can still be on
    their way): only an offset past those it wrote tells."""
    ours = (state.committed, state.uncertain)
    if fenced_in:
        another = committed not in ours
    else:
        known = max((o for o in ours if o is not None), default=-1)
        another = committed is not None and committed > known
    if another:
        raise ProducerFenced(f"{tp} was committed at {committed} by another owner")
