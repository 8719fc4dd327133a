"""A worker process: one consumer-group member serving the models of its repository.

The hot path, top to bottom:

    getmany (records as their batches hold them: `fetched`)
            ─► runs of records with the same headers (`run_end`)
            ─► Router.clean_tickets (headers only) ─► repository.resolve, once a run
            ─► intake.admit_all (decode + validate) ─► Ledger.admit_all ─► Batcher.put_all
      (a run that routing or its model refuses: the same steps record by record, `_accept`)
    Batcher ─► runtime.run in an executor ─► Replies (encode, write, await ack) ─► Ledger.settle_all
    commit loop ─► commit each partition's settled prefix

Bad input becomes an error result or a dead letter at the step that finds it; nothing
raises into the consume loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from surge.config import TOPIC_NAME, Settings, redis_url_for_bytes
from surge.schemas import ErrorCode
from surge.workers import fetched, metrics, writes
from surge.workers.acked import AckedWrites
from surge.workers.batcher import ModelHung
from surge.workers.ledger import Ledger
from surge.workers.replies import Replies
from surge.workers.repository import ModelRepository
from surge.workers.tasks import supervised, within
from surge.workers.tickets import Record, Rejection, Router, Ticket, run_end, unroutable
from surge.workers.topics import CannotCreateTopic, ensure_topics
from surge.workers.transactions import Transactions
from surge.workers.writes import RetryPolicy, TopicLookup, Write

log = structlog.get_logger("surge.worker")

_GETMANY_TIMEOUT_MS = 100  # how soon a stop request is noticed while the topics are idle
_PAUSED_KEEPALIVE_S = 1.0  # while paused, getmany still runs this often (max.poll.interval)
# Exactly once, paused with nothing released for this many reply_retry_s: outcomes wait on a
# transaction that cannot end (it wrote to a partition refusing every write, and its abort
# cannot be written either). They count in flight until it does, and fill the bounds for
# every partition: a restart hands them on, uncommitted, and the others go on.
_STALLED_RETRIES = 3
_FETCH_RETRY_S = 1.0
_COMMIT_RETRY_S = 5.0
_COMMIT_BACKOFF_S = 1.0
# aiokafka retries a commit on a retriable error for as long as it gets one: a partition of a
# topic deleted meanwhile answers one for ever, holding every partition's commits (and the
# lock a revocation's commit needs) behind it. Cut off, the next commit goes without it.
_COMMIT_LIMIT_S = 10.0
_SHUTDOWN_STEP_S = 10.0
# How long a rebalance waits for the assigned partitions' transactional ids: ids taken at once
# (tens of ms) are served as it ends; a partition taken later is served from then on. Longer
# would hold up the consumer's rebalance, and its heartbeats with it.
_FENCE_WAIT_S = 2.0
# Beside the drain (shutdown_timeout_s), the longest the rest of a shutdown takes: end the
# background loops and the fence-ins before it; commit, stop the consumer, close replies,
# writes, the producer and Redis after it; one step bound each.
SHUTDOWN_BEYOND_DRAIN_S = 8 * _SHUTDOWN_STEP_S
_TOPIC_LOOKUP_S = 5.0  # a reply topic not found by then dead-letters its result at once
_TOPIC = re.compile(TOPIC_NAME)
_POOL_CHECK_S = 1.0
_GC_YOUNG_THRESHOLD = 20_000  # Python's default is 700 (2000 from 3.13)

T = TypeVar("T")


class _CannotStart(Exception):
    """Start-up cannot finish for a reason the operator fixes, said in one line."""


def _redis_client(settings: Settings) -> Redis:
    """The client for Redis results. An option its URL gives that redis-py does not know
    fails here, not at the first result (and again after every restart)."""
    options = settings.redis.client_options()
    if settings.redis.min_replicas:
        # A command redis-py tried again would go on a new connection, whose WAIT counts none
        # of the results' writes: never tried again within redis-py (`Replies` does it).
        options["retry"] = Retry(NoBackoff(), 0)
    try:
        redis = Redis.from_url(redis_url_for_bytes(settings.redis.url), **options)
        pool = redis.connection_pool
        pool.connection_class(**pool.connection_kwargs)  # built, not connected
    except (TypeError, ValueError) as exc:
        raise _CannotStart(f"redis url: {exc}") from None
    return redis


class Stalled(RuntimeError):
    """Paused, exactly once, with no outcome released for too long."""


class _StoppedStarting(Exception):
    """A stop request came while start-up waited on the cluster."""


class Worker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.ready_hooks: list[Callable[[], None]] = []  # run once started, before consuming
        self.failed = False  # set when a background task crashed: exit non-zero
        self.hung = False  # a model call never returned: its thread cannot be joined
        self._untopical: set[str] = set()  # models without a topic of their own
        self._tasks: list[asyncio.Task[None]] = []
        # Partitions being given away since the fetch in hand was returned: the rest of
        # their records in it is left to the next owner, who reads it from the commit.
        self._revoked: set[TopicPartition] = set()
        # Paused while a model change gives them up, or while exactly-once fences them: the
        # consume loop, which pauses and resumes the others, must not resume these.
        self._held: set[TopicPartition] = set()
        # Exactly once: partitions whose transactional ids are still being taken (`_Rebalance`).
        self._fencing: dict[TopicPartition, asyncio.Task[None]] = {}
        self._ahead: set[str] = set()  # models with enough queued that fetching for them stops
        # What start-up opened, to close should it not finish (`_shutdown` closes the rest).
        self._opened: list[Callable[[], Awaitable[object]]] = []

    @property
    def threads_left(self) -> bool:
        """Model calls, loads or a scan of the model root still running on their threads (a
        hung call, a load cut short, a hung mount), which Python would wait for at exit, as
        long as they take."""
        repository = getattr(self, "_repository", None)  # none before start-up made it
        if repository is None:
            return False
        return bool(repository.calls_running + repository.loads_running + repository.scans_running)

    def _say_ready(self) -> None:
        """/ready: started, not stopping, and serving a model. One that found none (an empty
        or mis-mounted model root) must not take a serving pod's place in a rollout."""
        metrics.set_ready(bool(self._repository.served) and not self._stopping.is_set())

    def stop(self) -> None:
        """Begin a graceful shutdown (safe to call from a signal handler)."""
        self._stopping.set()

    async def run(self) -> None:
        try:
            await self._start()
        except (_CannotStart, _StoppedStarting, KafkaError, CannotCreateTopic) as exc:
            await self._abandon_start(exc)
            return
        try:
            for hook in self.ready_hooks:
                hook()
            self.ready.set()
            self._say_ready()
            await self._consume()
        finally:
            await self._shutdown()

    # -- start-up ---------------------------------------------------------------------------

    async def _start(self) -> None:
        kafka, worker = self.settings.kafka, self.settings.worker
        try:
            metrics.serve(self.settings.metrics.port)
        except OSError as exc:
            raise _CannotStart(f"metrics port {self.settings.metrics.port}: {exc}") from None
        self._redis = _redis_client(self.settings) if self.settings.redis.url else None
        if self._redis is not None:
            self._opened.append(self._redis.aclose)
        self._ledger = Ledger(worker.max_in_flight, worker.max_in_flight_bytes)
        retry = RetryPolicy(worker.dead_letter_topic, worker.reply_retry_s, self._crashed)
        producer_options = {
            **kafka.client_options(),
            "acks": "all",
            "enable_idempotence": True,
            "linger_ms": 0,  # replies leave as whole record batches: waiting adds nothing
            "max_batch_size": 256 * 1024,
            "max_request_size": kafka.max_request_size,
        }
        self._transactions: Transactions | None = None
        self._acked: AckedWrites | None = None
        if worker.delivery == "exactly_once":
            self._transactions = Transactions(
                worker.group_id,
                self._ledger,
                retry,
                producer_options,
                self._crashed,
                committed=lambda tp: self._consumer.committed(tp),
            )
            self._opened.append(self._transactions.close)
            kafka_sink = self._transactions.buffer
        else:

            async def new_producer() -> AIOKafkaProducer:
                """Started, or closed again: a start cut short leaves nothing open."""
                fresh = AIOKafkaProducer(**producer_options)
                try:
                    await fresh.start()
                except BaseException:
                    await fresh.stop()
                    raise
                return fresh

            producer = await self._unless_stopped(new_producer())
            self._opened.append(producer.stop)
            lookup = TopicLookup(kafka.client_options(), _TOPIC_LOOKUP_S)
            self._acked = AckedWrites(
                producer, self._ledger, retry, self._crashed, lookup, new_producer
            )
            self._acked.start()
            self._opened.append(self._acked.close)
            kafka_sink = self._acked.put
        # Loads take up to model_load_timeout_s each: a stop request must not wait for them all.
        await self._unless_stopped(self.serve_models(kafka_sink))
        if worker.create_topics:
            await self._unless_stopped(
                ensure_topics(
                    kafka,
                    [*self._topics, worker.dead_letter_topic],
                    worker.topic_partitions,
                    worker.topic_replication_factor,
                )
            )
        fetched.install()
        self._consumer = AIOKafkaConsumer(
            **kafka.client_options(),
            key_deserializer=fetched.lean_records,  # records as their batches hold them
            group_id=worker.group_id,
            enable_auto_commit=False,
            auto_offset_reset=worker.auto_offset_reset,
            isolation_level="read_committed",
            max_poll_interval_ms=worker.max_poll_interval_ms,
            session_timeout_ms=worker.session_timeout_ms,
            heartbeat_interval_ms=max(worker.session_timeout_ms // 3, 100),
            rebalance_timeout_ms=worker.max_poll_interval_ms,
            fetch_min_bytes=worker.fetch_min_bytes,
            fetch_max_wait_ms=worker.fetch_max_wait_ms,
            max_partition_fetch_bytes=max(worker.max_message_bytes, 1_048_576),
        )
        self._opened.append(self._consumer.stop)
        await self._unless_stopped(self._consumer.start())
        self._opened.clear()  # started: from here `_shutdown` closes everything
        if not self._stopping.is_set():  # stopped while the models loaded: join no group
            self._subscribe(self._topics)
        self._tasks = [
            supervised(self._commit_loop(), "commit", self._crashed),
            supervised(self._reload_loop(), "reload", self._crashed),
            supervised(self._forget_loop(), "forget-topics", self._crashed),
        ]
        if worker.stop_cuts_batches:
            log.warning(
                "stop_may_cut_batches",
                batch_time_budget_s=worker.batch_time_budget_s,
                fetch_ahead_s=worker.fetch_ahead_s,
                shutdown_timeout_s=worker.shutdown_timeout_s,
                hint="a batch a stop gives up on has its partitions' later results answered "
                "again: shutdown_timeout_s (and the grace period) at least the other two",
            )
        log.info(
            "worker_started",
            group=worker.group_id,
            topics=sorted(self._topics),
            models=[f"{n}:{v}" for n, v in sorted(self._repository.served)],
            event_loop=type(asyncio.get_running_loop()).__module__.partition(".")[0],
        )

    async def serve_models(self, kafka_sink: Callable[[Write], None]) -> None:
        """Load the models and build the path from records to outcomes, whose Kafka writes go
        to `kafka_sink`. Needs the ledger and the Redis client in place."""
        worker, redis = self.settings.worker, self.settings.redis
        self._replies = Replies(
            kafka_sink,
            self._redis,
            self._ledger,
            dead_letter_topic=worker.dead_letter_topic,
            redis_ttl_s=redis.result_ttl_s,
            redis_prefix=redis.key_prefix,
            on_crash=self._crashed,
            redis_min_replicas=redis.min_replicas,
            redis_timeout_s=redis.socket_timeout_s,
        )
        self._replies.start()
        self._opened.append(self._replies.close)
        self._repository = ModelRepository(
            Path(worker.model_root),
            worker.models,
            self._replies,
            time_budget_s=worker.batch_time_budget_s,
            max_tensor_elements=worker.max_tensor_elements,
            on_crash=self._crashed,
            load_timeout_s=worker.model_load_timeout_s,
        )
        self._opened.append(self._repository.close)
        await self._repository.reconcile(settle_s=0)
        self._topics = self._topic_models()
        self._router = self._make_router()

    async def _unless_stopped(self, step: Awaitable[T]) -> T:
        """A start-up step that waits on the cluster, cut short by a stop request: a broker
        that takes connections but never answers would hold a SIGTERM for its request
        timeout (30 s and more)."""
        task = asyncio.ensure_future(step)
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not task.done():
                task.cancel()
                await asyncio.wait([task])
        if task.cancelled():
            raise _StoppedStarting
        return task.result()

    async def _abandon_start(self, why: Exception) -> None:
        """Close what an unfinished start-up opened. A stop request is no failure; a cluster
        that cannot be reached is one line for the operator, not a traceback."""
        stopped = isinstance(why, _StoppedStarting)
        if not stopped:
            self.failed = True
            log.error(
                "startup_failed",
                error=str(why) or repr(why),
                bootstrap_servers=self.settings.kafka.bootstrap_servers,
            )
        for close in reversed(self._opened):
            with contextlib.suppress(Exception):
                await within(close(), _SHUTDOWN_STEP_S)
        self._opened.clear()
        _say_threads_outliving(getattr(self, "_repository", None))
        if stopped:
            log.info("worker_stopped", unfinished=0, while_starting=True)

    def _topic_models(self) -> dict[str, str | None]:
        """Request topic -> model it carries (None for shared topics, routed by header). A
        model whose name makes no topic Kafka accepts, or makes the dead-letter topic (whose
        letters would be consumed again, for ever), is served on shared topics only."""
        worker = self.settings.worker
        topics: dict[str, str | None] = {}
        for name in self._repository.model_names():
            topic = worker.topics.get(name, worker.topic_prefix + name)
            if _TOPIC.fullmatch(topic) and topic != worker.dead_letter_topic:
                topics[topic] = name
            elif name not in self._untopical:  # said once
                self._untopical.add(name)
                log.warning(
                    "model_topic_invalid",
                    model=name,
                    topic=topic,
                    hint="rename the model's directory or map it in [worker] topics",
                )
        topics.update(dict.fromkeys(worker.shared_topics))
        return topics

    async def _release_partitions(self) -> None:
        """Before a new subscription: finish and commit what was taken, since aiokafka drops
        the old assignment (and with it the right to commit it) as soon as we resubscribe."""
        assigned = self._consumer.assignment()
        self._held |= assigned
        self._consumer.pause(*assigned)
        await self._give_away(assigned, self.settings.worker.shutdown_timeout_s)

    async def _give_away(self, partitions: set[TopicPartition], drain_s: float) -> None:
        """Partitions leaving this worker: take in none of their records from now on, finish
        and commit what was taken (waiting up to `drain_s`), then forget them: their later
        outcomes move no offset and commit nothing."""
        self._revoked |= partitions
        try:
            try:
                await within(self._ledger.drained(partitions), drain_s)
            except TimeoutError:
                log.warning("revoke_drain_timeout", partitions=len(partitions))
            with contextlib.suppress(TimeoutError):  # commit what did settle, in any case
                await within(self.commit(), _SHUTDOWN_STEP_S)
        except Exception:  # a bug: kept, their state would commit a later owner's work
            log.exception("revoke_failed", partitions=len(partitions))
        # (Cancelled, by a stop under way: its own drain and commit take these too.)
        self._ledger.offsets.forget(partitions)
        if self._transactions is not None:
            await self._revoke_transactions(partitions)

    async def _revoke_transactions(self, partitions: set[TopicPartition]) -> None:
        """Drop the revoked partitions' transactions, bounded: one stuck on a coordinator
        that stopped answering would hold the rebalance until the group evicted this member,
        alive but serving nothing. A restart instead; the next owner fences what was open."""
        await self._stop_fencing(partitions)
        try:
            assert self._transactions is not None
            await within(self._transactions.revoke(partitions), _SHUTDOWN_STEP_S)
        except TimeoutError:
            self._crashed(TimeoutError("transactions of revoked partitions did not end"))

    async def _stop_fencing(self, partitions: Iterable[TopicPartition]) -> None:
        """Give up taking these partitions' transactional ids (they leave, or the worker
        stops): a fence-in waiting for a partition that cannot take markers never ends."""
        tasks = [task for tp in partitions if (task := self._fencing.pop(tp, None)) is not None]
        for task in tasks:
            task.cancel()
        if tasks:  # bounded, as the background loops are
            await asyncio.wait(tasks, timeout=_SHUTDOWN_STEP_S)

    def _subscribe(self, topics: dict[str, str | None]) -> None:
        if topics:
            self._consumer.subscribe(list(topics), listener=_Rebalance(self))
        else:  # nothing to serve yet: wait for models to appear
            self._consumer.unsubscribe()
            log.warning("no_models", model_root=self.settings.worker.model_root)

    def _crashed(self, exc: BaseException) -> None:
        """A background task died: stop cleanly; what it left unsettled is redelivered."""
        log.error("background_task_failed", error=repr(exc))
        self.failed = True
        self.hung = self.hung or isinstance(exc, ModelHung)
        self.stop()

    def _make_router(self) -> Router:
        worker = self.settings.worker
        return Router(
            self._topics,
            reply_topic_pattern=worker.reply_topic_pattern,
            default_reply_to=worker.default_reply_to,
            max_message_bytes=worker.max_message_bytes,
            redis_enabled=self._redis is not None,
            forbidden_reply_topics=[*self._topics, worker.dead_letter_topic],
        )

    # -- the consume loop -------------------------------------------------------------------

    async def _consume(self) -> None:
        consumer = self._consumer
        max_records = self.settings.worker.max_poll_records
        full = False  # the ledger's bounds reached: every partition waits for half to drain
        fewest, fewest_at = 0, 0.0  # while full: the fewest records in flight, since when
        stalled_s = _STALLED_RETRIES * self.settings.worker.reply_retry_s
        while not self._stopping.is_set():
            if not self._topics:  # no models yet: until a reload finds some, or a stop
                with contextlib.suppress(TimeoutError):
                    await within(self._stopping.wait(), self.settings.worker.reload_interval_s)
                continue
            if self._ledger.full and not full:
                full = True
                fewest, fewest_at = self._ledger.records, time.monotonic()
                metrics.PAUSED.set(1)
                log.info("paused", in_flight=self._ledger.records, bytes=self._ledger.bytes)
            elif full and self._ledger.has_room:
                full = False
                metrics.PAUSED.set(0)
                log.info("resumed", in_flight=self._ledger.records)
            elif full and self._ledger.records < fewest:
                fewest, fewest_at = self._ledger.records, time.monotonic()
            elif full and self._transactions and time.monotonic() - fewest_at > stalled_s:
                self._crashed(Stalled(f"paused, nothing released in {stalled_s:g}s"))
                return
            assigned = consumer.assignment()
            ahead = self._fetched_ahead(assigned)  # also when full: it updates the gauges
            stopped = assigned if full else (self._held | ahead | self._overdue()) & assigned
            self._pause_only(stopped)
            idle = bool(assigned) and stopped == assigned  # nothing to fetch
            if idle:  # until outcomes free room, but getmany keeps max.poll.interval alive
                with contextlib.suppress(TimeoutError):
                    await within(
                        self._ledger.room() if full else self._ledger.progress(),
                        _PAUSED_KEEPALIVE_S,
                    )
            try:
                # Bounded: during a rebalance getmany waits for the assignment, and a stop
                # request must still be noticed. A timeout scope, not a task: nothing else
                # runs between getmany's assignment check and the intake below.
                # No more records than the bound has room for: the rest are fetched later.
                room = self._ledger.room_for(max_records, 0)
                async with asyncio.timeout(_FETCH_RETRY_S):
                    batches = await consumer.getmany(
                        timeout_ms=0 if idle else _GETMANY_TIMEOUT_MS, max_records=room
                    )
            except TimeoutError:
                continue
            except KafkaError as exc:
                if not exc.retriable:  # authorisation, a dead coordinator: restart, don't idle
                    self._crashed(exc)
                    return
                log.error("fetch_failed", error=repr(exc))
                await asyncio.sleep(_FETCH_RETRY_S)
                continue
            await self.intake(batches)
            metrics.IN_FLIGHT.set(self._ledger.records)
            metrics.IN_FLIGHT_BYTES.set(self._ledger.bytes)

    def _fetched_ahead(self, assigned: set[TopicPartition]) -> set[TopicPartition]:
        """The partitions of the models with `fetch_ahead_s` of model time queued here (until
        a quarter is left): Kafka keeps the rest, where the group's other workers can take
        it, a rebalance waits less for what was taken, and no idle fetch costs the broker the
        CPU a busy model needs. Shared topics keep flowing for their other models."""
        worker = self.settings.worker
        ahead = self._repository.ahead(worker.fetch_ahead_s, self._ahead, worker.fetch_resume_s)
        if ahead != self._ahead:
            log.debug("fetching_ahead_stopped", models=sorted(ahead))
            for model in ahead ^ self._ahead:
                metrics.FETCH_STOPPED.labels(model).set(model in ahead)
            self._ahead = ahead
        if not ahead:
            return set()
        return {tp for tp in assigned if self._topics.get(tp.topic) in ahead}

    def _overdue(self) -> set[TopicPartition]:
        """Exactly once, the partitions whose transaction is held up (`Transactions.overdue`):
        they wait, and the others go on."""
        return set() if self._transactions is None else self._transactions.overdue

    def _pause_only(self, partitions: set[TopicPartition]) -> None:
        """Pause these partitions and resume the others."""
        paused = self._consumer.paused()
        if paused != partitions:
            self._consumer.resume(*(paused - partitions))
            self._consumer.pause(*(partitions - paused))

    async def intake(self, fetched: Mapping[TopicPartition, Sequence[Record]]) -> None:
        """Take in one fetch: each partition's records, in order. A partition revoked while
        this runs (it yields between partitions) keeps the rest of its records unread here:
        its offsets are committed up to what was taken, and its next owner reads on. Once
        the ledger is full, the records not taken yet are fetched again later: the bounds
        are passed by what one run of records holds beyond what its first record promised
        (a run's records share their headers; one whose route or model rejects it, answered
        record by record, is taken whole)."""
        self._revoked.clear()
        now_ms = int(time.time() * 1000)
        for tp, records in fetched.items():
            if tp in self._revoked:
                log.info("fetch_left_to_next_owner", partition=f"{tp.topic}:{tp.partition}")
                continue
            if records and self._ledger.full:  # read again, and timed, once there is room
                self._consumer.seek(tp, records[0].offset)
                continue
            stamped = records[0].timestamp if records else None
            if stamped is not None and stamped > 0:  # v0 records carry none, some -1
                # Clocks differ: a record stamped in our future is not behind.
                metrics.RECORD_AGE.labels(tp.topic).observe(max(0, now_ms - stamped) / 1000)
            received = time.monotonic()
            start = 0
            while start < len(records):
                if self._ledger.full:
                    self._consumer.seek(tp, records[start].offset)  # read again once there is room
                    break
                end = run_end(records, start)
                run = records[start:end]
                taken = self._accept_run(run, tp, received, now_ms)
                if taken is None:
                    for record in run:
                        self._accept(record, tp, received, now_ms)
                    taken = len(run)
                start += taken
            await asyncio.sleep(0)  # let replies and batches move between partitions

    def _accept_run(
        self, run: Sequence[Record], tp: TopicPartition, received: float, now_ms: int
    ) -> int | None:
        """Records with the same headers, taken in together: one route, one model, their
        bodies read as one array where they are laid out alike (`Intake.admit_all`). Takes
        as many as the ledger has room for, judged by the first (at least one), and says how
        many. None leaves them all to `_accept`: a route, a deadline or a model that rejects
        them (the same for all), or a record too large, is answered there."""
        try:
            tickets = self._router.clean_tickets(run, tp, received)
            if tickets is None or tickets[0].expired(now_ms):
                return None
            assert tickets[0].model is not None
            served = self._repository.resolve(tickets[0].model, tickets[0].version)
            if isinstance(served, Rejection):
                return None
            # Each holds its record and, once queued, a result of a row or more.
            each = tickets[0].size + served.intake.result_row_bytes
            fits = self._ledger.room_for(len(tickets), each)
            if fits < len(tickets):
                del tickets[fits:]
            jobs, rejected = served.intake.admit_all(tickets)
        except Exception:  # nothing is admitted yet: one by one, each answers for itself
            log.exception("run_failed", topic=tp.topic, partition=tp.partition)
            return None
        self._ledger.admit_all(tickets)
        try:
            for ticket, rejection in rejected:
                self._reject(ticket, rejection)
            row_bytes = served.intake.result_row_bytes
            for job in jobs:
                self._ledger.hold_all(job.tickets, [job.each * row_bytes] * len(job.tickets))
            served.batcher.put_all(jobs)
        except Exception as exc:  # a bug: each record admitted still gets its one outcome
            log.exception("accept_failed", topic=tp.topic, partition=tp.partition)
            rejection = Rejection(ErrorCode.INTERNAL, f"internal error: {exc!r}")
            for ticket in tickets:
                if not ticket.answered:
                    self._reject(ticket, rejection)
        return len(tickets)

    def _accept(self, record: Record, tp: TopicPartition, received: float, now_ms: int) -> None:
        """Every record leaves here with an outcome queued (or, on a bug, unsettled and so
        redelivered after a restart): never with an exception."""
        try:
            ticket, rejection = self._router.ticket(record, tp, received)
        except Exception as exc:
            log.exception("routing_failed", topic=tp.topic, offset=record.offset)
            ticket, rejection = unroutable(record, tp), Rejection(ErrorCode.INTERNAL, repr(exc))
        self._ledger.admit(ticket)
        try:
            if rejection is None:
                rejection = self._dispatch(ticket, now_ms)
        except Exception as exc:
            log.exception("accept_failed", request_id=ticket.request_id)
            rejection = Rejection(ErrorCode.INTERNAL, f"internal error: {exc!r}")
        if rejection is not None:
            self._reject(ticket, rejection)

    def _reject(self, ticket: Ticket, rejection: Rejection) -> None:
        try:
            self._replies.error(ticket, rejection)
        except Exception:
            log.exception("reply_failed", request_id=ticket.request_id)

    def _dispatch(self, ticket: Ticket, now_ms: int) -> Rejection | None:
        """Queue the ticket on its model's batcher, or say why not."""
        if ticket.expired(now_ms):
            return Rejection(ErrorCode.EXPIRED, "deadline passed before the request was read")
        assert ticket.model is not None
        served = self._repository.resolve(ticket.model, ticket.version)
        if isinstance(served, Rejection):
            return served
        job = served.intake.admit(ticket)
        if isinstance(job, Rejection):
            return job
        self._ledger.hold(ticket, job.rows * served.intake.result_row_bytes)
        served.batcher.put(job)
        return None

    # -- offsets ----------------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        interval = self.settings.worker.commit_interval_ms / 1000
        while True:
            if not self._ledger.offsets.committable():
                # Nothing to commit: wake on progress, or now and then anyway.
                with contextlib.suppress(TimeoutError):
                    await within(self._ledger.progress(), _COMMIT_RETRY_S)
            await asyncio.sleep(interval)  # coalesce many settlements into one commit
            if not await self.commit():
                await asyncio.sleep(_COMMIT_BACKOFF_S)  # a broker or group in trouble

    async def _forget_loop(self) -> None:
        """Now and then, the producers stop asking the cluster about the topics they have
        not written to lately (`RecentTopics`)."""
        outcomes = self._transactions or self._acked
        while outcomes is not None:
            await asyncio.sleep(writes.METADATA_MAX_IDLE_S / 5)
            await outcomes.forget_idle_topics()

    async def commit(self) -> bool:
        """Commit each assigned partition's settled prefix; False if some of it failed."""
        assigned = self._consumer.assignment()
        positions = {
            tp: p for tp, p in self._ledger.offsets.committable().items() if tp in assigned
        }
        if not positions:
            return True
        if self._transactions is not None:  # with their results, partition by partition
            started = time.perf_counter()
            committed = await self._transactions.commit(positions)
            self._ledger.offsets.committed(committed)
            log.debug(
                "transactions_committed",
                partitions=len(committed),
                failed=len(positions) - len(committed),
                seconds=round(time.perf_counter() - started, 4),
            )
            # A partition whose transaction waits on a reply partition is no failure of the
            # round: backing off would delay every other partition's results.
            held = self._transactions.overdue
            return all(tp in committed or tp in held for tp in positions)
        # Of a topic gone from the cluster (deleted): a commit would be retried for ever. They
        # leave with the rebalance that follows; no failure of the round meanwhile.
        topics = {tp.topic for tp in positions}
        gone = {t for t in topics if self._consumer.partitions_for_topic(t) is None}
        positions = {tp: p for tp, p in positions.items() if tp.topic not in gone}
        if not positions:
            return True
        try:
            await within(self._consumer.commit(positions), _COMMIT_LIMIT_S)
        except KafkaError as exc:  # e.g. a rebalance under way: the next commit carries it
            log.warning("commit_failed", error=repr(exc))
            return False
        except TimeoutError:
            log.warning("commit_timed_out", partitions=len(positions), seconds=_COMMIT_LIMIT_S)
            return False
        self._ledger.offsets.committed(positions)
        return True

    # -- hot reload -------------------------------------------------------------------------

    async def _reload_loop(self) -> None:
        interval = self.settings.worker.reload_interval_s
        worker = self.settings.worker
        while True:
            await asyncio.sleep(interval)
            try:
                await self._repository.reconcile()
                topics = self._topic_models()
                if topics == self._topics:
                    continue
                if worker.create_topics:
                    await ensure_topics(
                        self.settings.kafka,
                        topics,
                        worker.topic_partitions,
                        worker.topic_replication_factor,
                    )
                try:
                    await self._release_partitions()
                except asyncio.CancelledError:
                    raise  # stopping: the shutdown commits the assignment still held
                except Exception:  # resubscribe anyway: a new assignment starts afresh
                    log.exception("release_failed")  # from the committed offsets
                self._subscribe(topics)
                self._held = set()
                self._topics = topics
                self._router = self._make_router()
                self._say_ready()
                log.info("subscription_changed", topics=sorted(topics))
            except Exception:
                log.exception("reload_failed")

    # -- shutdown ---------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        """Stop fetching, finish in-flight batches, publish, commit, leave the group. Each
        step runs even if one before it failed, all within shutdown_timeout_s."""
        log.info("worker_stopping", in_flight=self._ledger.records)
        metrics.set_ready(False)
        began = time.monotonic()
        self._consumer.pause(*self._consumer.assignment())
        for task in self._tasks:
            task.cancel()
        if self._tasks:  # bounded: a loop that outlives its cancellation must not hold the stop
            _, stuck = await asyncio.wait(self._tasks, timeout=_SHUTDOWN_STEP_S)
            if stuck:
                log.error("tasks_outlived_cancel", tasks=sorted(t.get_name() for t in stuck))
        await self._stop_fencing(list(self._fencing))
        try:
            async with asyncio.timeout(self.settings.worker.shutdown_timeout_s):
                await self._repository.close()
                await self._ledger.drained(leaving=self._repository.abandoned)
        except TimeoutError:
            log.error("shutdown_timeout", unfinished=self._ledger.records)
        except Exception:
            log.exception("shutdown_drain_failed", unfinished=self._ledger.records)
        steps = {
            "commit": self.commit,
            "leave_group": self._consumer.stop,
            "replies": self._replies.close,
        }
        if self._transactions is not None:
            steps["transactions"] = self._transactions.close
        else:
            assert self._acked is not None
            steps |= {"writes": self._acked.close, "producer": self._acked.producer.stop}
        timings = {"drain": time.monotonic() - began}
        for name, step in steps.items():
            began = time.monotonic()
            try:  # commit, then leave the group: partitions move at once
                await within(step(), _SHUTDOWN_STEP_S)
            except Exception:  # a commit caught in a rebalance must not keep the process up
                log.exception("shutdown_step_failed", step=name)
            timings[name] = time.monotonic() - began
        if self._redis is not None:
            with contextlib.suppress(Exception):  # a TLS close to a dead server can hang
                await within(self._redis.aclose(), _SHUTDOWN_STEP_S)
        if running := self._repository.calls_running:
            # Python would wait for their threads at exit, as long as they take: the process
            # exits without them (status 1), and what they held is redelivered.
            log.error("model_calls_outlived_shutdown", calls=running)
            self.hung = True
        _say_threads_outliving(self._repository)
        # Each step's seconds: a stop that nears the orchestrator's grace period says where.
        steps_s = {name: round(seconds, 3) for name, seconds in timings.items()}
        log.info("worker_stopped", unfinished=self._ledger.records, steps_s=steps_s)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Finish and commit what was taken from a partition before giving it away."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if not revoked:
            return
        worker = self._worker
        limit = min(
            worker.settings.worker.shutdown_timeout_s,
            worker.settings.worker.max_poll_interval_ms / 2000,
        )
        await worker._give_away(revoked, limit)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if self._worker._transactions is not None and assigned:
            await self._fence(assigned)
        log.info(
            "partitions_assigned",
            partitions=_names(sorted(assigned)),
        )

    async def _fence(self, assigned: set[TopicPartition]) -> None:
        """Exactly-once: take the partitions' transactional ids first (which waits for the
        previous owner's last transaction to finish, or aborts it), then start from the
        offsets committed by then. The consumer read its positions before that, possibly
        under a transaction still committing: what was read from them is read again.

        Each partition is taken on its own, and served once it is. One whose previous
        transaction cannot end (it wrote to a partition refusing every write, whose markers
        wait for it) stays paused and is taken when it can, while the others are served:
        a restart would not take it sooner, and would stop the others too."""
        worker = self._worker
        worker._consumer.pause(*assigned)
        worker._held |= assigned
        fencing = {
            tp: supervised(self._fence_one(tp), f"fence-{tp.topic}-{tp.partition}", worker._crashed)
            for tp in assigned
        }
        worker._fencing |= fencing
        _, late = await asyncio.wait(fencing.values(), timeout=_FENCE_WAIT_S)
        if late:
            waiting = sorted(tp for tp, task in fencing.items() if task in late)
            log.warning("partitions_not_fenced_in_yet", partitions=_names(waiting))

    async def _fence_one(self, tp: TopicPartition) -> None:
        worker = self._worker
        consumer, transactions = worker._consumer, worker._transactions
        assert transactions is not None
        began = time.monotonic()
        try:
            committed = (await transactions.assign([tp]))[tp]
        except Exception as exc:
            # Not fenced in, nor moved to the committed offset: whatever were read or
            # committed for it now would answer twice and move the group's offsets back.
            # It stays paused, with no transaction of its own left to commit, while the
            # worker restarts and joins again.
            worker._fencing.pop(tp, None)
            await transactions.revoke([tp])
            worker._crashed(exc)
            return
        worker._fencing.pop(tp, None)
        restart = committed if committed is not None else worker._ledger.offsets.first(tp)
        if restart is not None:  # None: nothing committed nor read yet
            consumer.seek(tp, restart)
        worker._ledger.offsets.forget([tp])
        worker._held.discard(tp)
        consumer.resume(tp)
        if time.monotonic() - began > _FENCE_WAIT_S:  # said to be late: say it is served
            log.info("partitions_fenced_in", partitions=_names([tp]))


def _names(partitions: Iterable[TopicPartition]) -> list[str]:
    return [f"{tp.topic}:{tp.partition}" for tp in partitions]


def _say_threads_outliving(repository: ModelRepository | None) -> None:
    """Loads cut short by the stop (or past model_load_timeout_s before it) and a scan stuck
    on the file system, whose threads the process exits without: a failed load or a slow
    scan was said when it happened, and a stop asked for is no failure (status 0)."""
    if repository is None:
        return
    if loading := repository.loads_running:
        log.warning("model_loads_outlived_shutdown", loads=loading)
    if repository.scans_running:
        log.warning("model_scan_outlived_shutdown", root=str(repository.root))


async def _stop_without(pool: int, worker: Worker) -> None:
    """A pool member stops once its pool is gone (killed with SIGKILL, say): nothing would
    stop it then, and a new pool's members would find its metrics ports taken."""
    while os.getppid() == pool:  # noqa: ASYNC110 (no event tells of a parent's death)
        await asyncio.sleep(_POOL_CHECK_S)
    log.warning("pool_gone", pool=pool)
    worker.stop()


def collect_young_less_often() -> None:
    """Requests make many short-lived objects: at Python's default threshold, collecting
    them costs a third of the hot path."""
    gc.set_threshold(_GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def run(settings: Settings) -> None:
    """Serve `settings` on the event loop they choose, until SIGTERM or SIGINT."""
    run_on(settings.worker.event_loop, serve(settings))


def run_on(event_loop: str, main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on the event loop `worker.event_loop` names."""
    if event_loop == "uvloop":
        import uvloop  # a dependency wherever it builds (not Windows)

        return uvloop.run(main)
    return asyncio.run(main)


async def serve(settings: Settings) -> None:
    """Run a worker until SIGTERM or SIGINT, then shut it down gracefully."""
    collect_young_less_often()
    worker = Worker(settings)
    worker.ready_hooks.append(gc.freeze)  # never rescan what start-up allocated (models)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    pool = os.environ.get("SURGE_POOL_PID")
    watch = asyncio.create_task(_stop_without(int(pool), worker)) if pool else None
    await worker.run()
    if watch is not None:
        watch.cancel()
    if worker.threads_left:  # the interpreter would wait for those threads at exit
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1 if worker.hung or worker.failed else 0)
    if worker.failed:
        sys.exit(1)
