"""The last stage: encode outcomes, write them to Kafka, Redis or the dead-letter topic, and
settle each record in the ledger only once its write is durable.

Every ticket gets exactly one outcome here. Kafka writes go to a sink chosen once:
`AckedWrites` (at-least-once: record batches, settled on acknowledgement) or `Transactions`
(exactly-once: settled when their transaction commits). Redis results are written
idempotently by request id in both modes; one that Redis refuses becomes a dead letter.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import structlog
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from surge.schemas import ErrorCode, ErrorResponse, InferenceResponse, Status, encode, headers
from surge.schemas.headers import REPLY_TO_REDIS
from surge.workers import metrics
from surge.workers.ledger import Ledger
from surge.workers.tasks import Outbox, supervised
from surge.workers.tickets import Rejection, Ticket
from surge.workers.writes import (
    RETRY_FIRST_S,
    RETRY_MAX_S,
    Headers,
    Records,
    Write,
    dead_letter,
)

log = structlog.get_logger("surge.replies")

_ERRORS = {code: metrics.ERRORS.labels(code) for code in ErrorCode}
_HEADER_SETS = 1024  # result headers kept for reuse, by (status, content type, model, code)
_REDIS_CHUNK = 512  # results per script call
# ... and about this many bytes of them: a script call is one command, which Redis reads whole
# before it runs it (a pipeline's commands run as they arrive).
_REDIS_CHUNK_BYTES = 4 << 20
# A call of more than this that times out is split in two: on a slow link the whole would time
# out at every try. A smaller one timing out means Redis itself is not answering. The same for
# a call whose connection Redis drops while it answers a PING: one of its results is longer
# than Redis takes (`proto-max-bulk-len`), which it answers by closing the connection.
_SPLIT_ON_TIMEOUT_BYTES = 64 << 10
# Tries of one such result alone, with Redis answering a PING after each, before it counts as
# refused: a result no try can get through would hold up every later one.
_LONE_TRIES = 3
_CUT_OFF = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)
# KEYS: result keys; ARGV: their bodies, then the TTL. The first result of an id wins and only
# it is announced: a redelivered request never produces a second visible result (nor a second
# notification). A result is stored and announced, or neither: one whose PUBLISH is refused (a
# channel the ACL forbids) is deleted again, and comes back in the reply, [index, error, ...],
# with any other result Redis refused, to be dead-lettered. One call for many results: a
# command costs redis-py more than this loop costs Redis. With `touch`, a result already there
# has its TTL set again: a write replicated like any other, so that a WAIT after this call
# counts it even on a connection other than the one that stored it (WAIT waits for the
# replication of its own connection's writes only).
_SET_AND_PUBLISH = """
local ttl = ARGV[#KEYS + 1]
local touch = ARGV[#KEYS + 2] == '1'
local refused = {}
for i = 1, #KEYS do
    local set = redis.pcall('SET', KEYS[i], ARGV[i], 'NX', 'EX', ttl)
    local failed = type(set) == 'table' and set.err
    if set and not failed then
        local published = redis.pcall('PUBLISH', KEYS[i], ARGV[i])
        failed = type(published) == 'table' and published.err
        if failed then  -- unannounced, it is no result: refused (kept if DEL is refused too)
            redis.pcall('DEL', KEYS[i])
        end
    elseif not set and touch then
        redis.pcall('EXPIRE', KEYS[i], ttl)
    end
    if failed then
        refused[#refused + 1] = i
        refused[#refused + 1] = failed
    end
end
return refused
"""
# What Redis answers when it cannot take a write now, whatever the write: it is down, loading,
# a read-only replica after a failover, full (maxmemory without eviction), busy with a script,
# unable to persist or to reach the replicas it must write to.
# Retried until it can, offsets held back meanwhile, as through an outage. Anything else is a
# refusal of what was written (a key the ACL forbids, a cluster slot it does not serve).
_UNAVAILABLE = (
    redis_errors.ConnectionError,  # wrong credentials and too many clients included
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,
    redis_errors.OutOfMemoryError,
    redis_errors.TryAgainError,
    redis_errors.MasterDownError,
    redis_errors.ClusterDownError,
    OSError,
)
# The same, as error replies begin: inside the script (a result refused alone) and where
# redis-py has no class for them.
_UNAVAILABLE_CODES = tuple(
    f"{code} "
    for code in (
        *("LOADING", "READONLY", "OOM", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN"),
        *("BUSY", "MISCONF", "NOREPLICAS"),
    )
)


class Replies:
    def __init__(
        self,
        kafka: Callable[[Write | Records], None],
        redis: Redis | None,
        ledger: Ledger,
        *,
        dead_letter_topic: str,
        redis_ttl_s: int,
        redis_prefix: str,
        on_crash: Callable[[BaseException], None],
        redis_min_replicas: int = 0,
        redis_timeout_s: float = 5.0,
    ) -> None:
        self._put = kafka  # AckedWrites.put (at-least-once) or Transactions.buffer
        self._redis = redis
        self._ledger = ledger
        self._dead_letter_topic = dead_letter_topic
        self._ttl = redis_ttl_s
        self._prefix = redis_prefix
        self._min_replicas = redis_min_replicas
        # How long WAIT may take: within the socket timeout, or the client gives up first.
        self._replicas_wait_ms = max(1, int(redis_timeout_s * 1000 / 2))
        self._touch = int(redis_min_replicas > 0)  # see _SET_AND_PUBLISH
        self._on_crash = on_crash
        self._redis_box = Outbox()
        self._set_and_publish = redis.register_script(_SET_AND_PUBLISH) if redis else None
        # Result headers but the request id, by (status, content type, model, error code).
        self._common_headers: dict[tuple[Any, ...], Headers] = {}
        self._task: asyncio.Task[None] | None = None
        self._check: asyncio.Future[None] | None = None

    def start(self) -> None:
        if self._redis is not None:
            self._task = supervised(self._redis_loop(), "replies-redis", self._on_crash)
            if self._min_replicas:
                self._check = asyncio.ensure_future(self._check_replicas())

    async def close(self) -> None:
        for task in (self._task, self._check):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _check_replicas(self) -> None:
        """Say at start where Redis has fewer replicas than `min_replicas`: every result
        would wait, its request uncommitted, with nothing but retries to show for it."""
        assert self._redis is not None
        try:
            replication = await self._redis.info("replication")
        except (RedisError, OSError) as exc:  # an ACL or a proxy may refuse INFO
            log.info("redis_replicas_unknown", error=_describe(exc))
            return
        replicas = int(replication.get("connected_slaves", 0))
        if replicas < self._min_replicas:
            log.warning(
                "redis_short_of_replicas",
                replicas=replicas,
                min_replicas=self._min_replicas,
                effect="results to Redis wait, their requests uncommitted, until enough "
                "replicas are connected",
            )

    # -- outcomes -------------------------------------------------------------------------

    def ok(self, ticket: Ticket, response: InferenceResponse) -> None:
        """Raises what encoding raises, with the ticket still unanswered."""
        body = encode(response, ticket.content_type)
        if self._first_outcome(ticket):
            self._deliver(ticket, Status.OK, body, None)

    def ok_body(self, ticket: Ticket, body: bytes) -> None:
        """`ok` for a response already encoded in the ticket's content type."""
        if self._first_outcome(ticket):
            self._deliver(ticket, Status.OK, body, None)

    def ok_bodies(self, tickets: Sequence[Ticket], bodies: Sequence[bytes]) -> None:
        """`ok_body` for a batch's tickets, in order: their result headers decided once for
        each model and content type, their bodies held in the ledger at once, and the
        results for each reply topic handed over as one `Records`."""
        by_topic: dict[str, Records] = {}
        records: Records | None = None
        content_type = model = None
        common: Headers = []
        for ticket, body in zip(tickets, bodies, strict=True):
            reply_to = ticket.reply_to
            if ticket.answered or reply_to is None or reply_to == REPLY_TO_REDIS:
                self.ok_body(ticket, body)  # the rarer ways, as one at a time takes them
                continue
            ticket.answered = True
            if records is None or reply_to != records.topic:
                records = by_topic.get(reply_to)
                if records is None:
                    records = by_topic[reply_to] = Records(reply_to)
            if ticket.content_type != content_type or ticket.model != model:
                content_type, model = ticket.content_type, ticket.model
                common = self._headers(Status.OK, content_type, model, None)
            raw_id = ticket.request_id.encode()
            records.tickets.append(ticket)
            records.keys.append(ticket.key or raw_id)
            records.values.append(body)
            records.ids.append(raw_id)
            records.headers.append(common)  # shared: a record's own go in `ids`
        for records in by_topic.values():
            records.writes = [None] * len(records.tickets)
            # Held before they are handed over: a sink may settle them at once.
            self._ledger.hold_all(records.tickets, list(map(len, records.values)))
            self._put(records)

    def error(self, ticket: Ticket, rejection: Rejection) -> None:
        """An error result to the reply target, or a dead letter when there is none."""
        if not self._first_outcome(ticket):
            return
        _ERRORS[rejection.code].inc()  # once per request: a result refused later is not
        if ticket.reply_to is None:
            self._put(dead_letter(ticket, rejection, self._dead_letter_topic))
            return
        status = Status.EXPIRED if rejection.code is ErrorCode.EXPIRED else Status.ERROR
        body = ErrorResponse(error=rejection.message, code=rejection.code, id=ticket.request_id)
        self._deliver(ticket, status, encode(body, ticket.content_type), rejection.code)

    def _first_outcome(self, ticket: Ticket) -> bool:
        if ticket.answered:
            log.error("second_outcome_dropped", request_id=ticket.request_id)
            return False
        ticket.answered = True
        return True

    def _deliver(self, ticket: Ticket, status: Status, body: bytes, code: ErrorCode | None) -> None:
        self._ledger.hold(ticket, len(body))
        if ticket.reply_to == REPLY_TO_REDIS:
            self._redis_box.put((ticket, body))
            return
        common = self._headers(status, ticket.content_type, ticket.model, code)
        result_headers = [(headers.REQUEST_ID, ticket.request_id.encode()), *common]
        assert ticket.reply_to is not None
        self._put(Write(ticket, ticket.reply_to, body, result_headers, False))

    def _headers(
        self, status: Status, content_type: str, model: str | None, code: ErrorCode | None
    ) -> Headers:
        """A result's headers but its request id."""
        key = (status, content_type, model, code)
        common = self._common_headers.get(key)
        if common is None:
            if len(self._common_headers) >= _HEADER_SETS:  # models named by any header
                self._common_headers.clear()
            common = self._common_headers[key] = [
                (headers.STATUS, status.encode()),
                (headers.CONTENT_TYPE, content_type.encode()),
                *([(headers.MODEL, model.encode())] if model else []),
                *([(headers.ERROR_CODE, code.encode())] if code is not None else []),
            ]
        return common

    # -- Redis ----------------------------------------------------------------------------

    async def _redis_loop(self) -> None:
        while True:
            items: list[tuple[Ticket, bytes]] = await self._redis_box.take(_REDIS_CHUNK)
            # Each chunk settled as it is stored: a later one Redis holds up (waiting for its
            # replicas, say) must not hold back the commits of those stored before it.
            for chunk in _chunks_by_size(items, _REDIS_CHUNK_BYTES):
                self._settle_redis(chunk, await self._write_redis(chunk))

    def _settle_redis(
        self, items: list[tuple[Ticket, bytes]], refused: list[tuple[Ticket, Exception]]
    ) -> None:
        for ticket, exc in refused:  # settled once the dead-letter topic has it
            reason = f"result could not be stored in Redis: {_describe(exc)}"
            rejection = Rejection(ErrorCode.REPLY_FAILED, reason)
            self._put(dead_letter(ticket, rejection, self._dead_letter_topic))
        refused_ids = {id(ticket) for ticket, _ in refused}
        stored = [ticket for ticket, _ in items if id(ticket) not in refused_ids]
        self._ledger.settle_all(stored)
        metrics.outcomes_durable("redis", (ticket.received for ticket in stored))

    async def _write_redis(
        self, items: list[tuple[Ticket, bytes]]
    ) -> list[tuple[Ticket, Exception]]:
        """SET NX each result, then PUBLISH it if that set it, so a waiting client wakes at
        once; in one script call, retried while Redis is unavailable. The results Redis
        refuses come back, the others are stored. A whole call refused (a key the ACL forbids:
        checked before the script runs, so nothing of it was done) is split in halves, down to
        single results."""
        assert self._set_and_publish is not None
        refused: list[tuple[Ticket, Exception]] = []
        delay = RETRY_FIRST_S
        lone_tries = 0  # of a single large result cut off while Redis answers
        while True:
            keys = [self._prefix + ticket.request_id for ticket, _ in items]
            try:
                reply = await self._set_and_publish(
                    keys=keys, args=[*(b for _, b in items), self._ttl, self._touch]
                )
            except (RedisError, OSError) as exc:
                # Halved to find the results Redis refuses; and halved when a call this large
                # was cut off (timed out, or dropped while Redis answers), which it would be
                # at every try.
                cut_off = (
                    isinstance(exc, _CUT_OFF)
                    and sum(len(body) for _, body in items) > _SPLIT_ON_TIMEOUT_BYTES
                    and (isinstance(exc, redis_errors.TimeoutError) or await self._answers())
                )
                if (cut_off or not _unavailable(exc)) and len(items) > 1:
                    half = len(items) // 2
                    return [
                        *refused,
                        *await self._write_redis(items[:half]),
                        *await self._write_redis(items[half:]),
                    ]
                if not _unavailable(exc):
                    return [*refused, *_refused([(items[0][0], exc)])]
                if cut_off:
                    lone_tries += 1
                    # A timeout has not asked Redis yet (a dropped connection has).
                    timed_out = isinstance(exc, redis_errors.TimeoutError)
                    if lone_tries >= _LONE_TRIES and (not timed_out or await self._answers()):
                        size = len(items[0][1])
                        why = (
                            f"{size} bytes, cut off {lone_tries} times while Redis answers (over"
                            " its proto-max-bulk-len, or slower to send than socket_timeout_s)"
                        )
                        cause = _CutOff(f"{why}: {_describe(exc)}")
                        return [*refused, *_refused([(items[0][0], cause)])]
                error, waiting = exc, items
            else:
                # Results refused one by one: those Redis cannot take now wait with the others.
                waiting, error, dropped = [], None, set()
                for index, message in zip(reply[0::2], reply[1::2], strict=True):
                    text = message.decode(errors="replace")
                    if text.startswith(_UNAVAILABLE_CODES):
                        waiting.append(items[index - 1])
                        error = ResponseError(text)
                    else:
                        refused += _refused([(items[index - 1][0], ResponseError(text))])
                        dropped.add(index)
                if self._min_replicas:
                    error = error or await self._short_of_replicas()
                    if error is not None:
                        # Stored, not yet where they must be (or, with some waiting, perhaps
                        # not where the next try goes): all but the refused tried again, SET
                        # NX keeping those stored as they are and announcing none twice.
                        waiting = [item for i, item in enumerate(items, 1) if i not in dropped]
                if not waiting:
                    return refused
            items = waiting
            metrics.REPLY_RETRIES.labels("redis").inc(len(items))
            log.warning(
                "redis_write_retry", error=_describe(error), results=len(items), retry_in=delay
            )
            # The next try on new connections: one to a primary that a failover made a replica
            # answers READONLY for as long as it stays open, while the name it was reached by
            # now leads to the new primary.
            assert self._redis is not None
            if not isinstance(error, _ShortOfReplicas):  # the connection itself is fine
                await self._redis.connection_pool.disconnect()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def _short_of_replicas(self) -> Exception | None:
        """Why the results of the call just made are not safe yet, or None: WAIT, for up to
        half the socket timeout, says how many replicas have every write of this connection
        so far. A WAIT that fails (refused by an ACL, a proxy that lacks it, a timeout) leaves
        them waiting like too few replicas: they are stored, so never refused for it."""
        assert self._redis is not None
        try:
            replicas = int(await self._redis.wait(self._min_replicas, self._replicas_wait_ms))
        except (RedisError, OSError) as exc:
            return _ShortOfReplicas(f"WAIT failed: {_describe(exc)}")
        if replicas < self._min_replicas:
            return _ShortOfReplicas(f"{replicas} of {self._min_replicas} replicas have them")
        return None

    async def _answers(self) -> bool:
        """Whether Redis answers a PING (within the socket timeout)."""
        assert self._redis is not None
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False


class _CutOff(Exception):
    """A result whose every write was cut off (timed out, or its connection dropped) while
    Redis kept answering: too long for Redis, or for the link, to take within the timeout."""


class _ShortOfReplicas(Exception):
    """Results stored on the primary, and not yet known to be on `min_replicas` replicas."""


def _unavailable(exc: BaseException) -> bool:
    return isinstance(exc, _UNAVAILABLE) or str(exc).startswith(_UNAVAILABLE_CODES)


def _refused(refused: list[tuple[Ticket, Exception]]) -> list[tuple[Ticket, Exception]]:
    for ticket, exc in refused:
        log.error("redis_write_refused", request_id=ticket.request_id, error=_describe(exc))
    return refused


def _describe(exc: BaseException | None) -> str:
    """The class and Redis's own words (a redis-py error's repr leaves the words out)."""
    return f"{type(exc).__name__}: {exc}"


def _chunks_by_size(
    items: list[tuple[Ticket, bytes]], limit: int
) -> Iterator[list[tuple[Ticket, bytes]]]:
    """Consecutive runs of items whose bodies add up to at most `limit` bytes (one item may be
    over it alone)."""
    chunk: list[tuple[Ticket, bytes]] = []
    size = 0
    for item in items:
        if chunk and size + len(item[1]) > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += len(item[1])
    if chunk:
        yield chunk
