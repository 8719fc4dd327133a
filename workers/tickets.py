"""Tickets: what a worker knows of a consumed record before decoding its body.

Routing reads headers only. A ticket always comes back, with a rejection when the record
cannot be served, so every record ends as a result or a dead letter.
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import msgspec
from aiokafka import TopicPartition

from surge.schemas import JSON, ErrorCode, headers, key_id
from surge.schemas.headers import CONTENT_TYPES, REPLY_TO_REDIS


class Record(Protocol):
    """The parts of a fetched record a worker reads (its topic and partition come with the
    fetch): an aiokafka ConsumerRecord, or a record as its batch holds it (`fetched`)."""

    offset: int
    # ms since the epoch, the producer's (CreateTime) or the broker's; None or -1 when unset
    timestamp: int | None
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes | None]]


@dataclass(frozen=True, slots=True)
class Rejection:
    code: ErrorCode
    message: str


class Ticket(msgspec.Struct, eq=False, gc=False):
    """One consumed record: where it came from, where its outcome goes, and its progress.

    A Struct, not a dataclass: one is made per record, and its constructor runs in C (a
    third of a dataclass's time). Compared by identity. Untracked by the garbage collector
    (`gc=False`): nothing it holds refers back to it, and thousands are in flight at once,
    which the collector's young generation would otherwise scan again and again."""

    tp: TopicPartition
    offset: int
    key: bytes | None
    value: bytes
    headers: Sequence[tuple[str, bytes | None]]
    request_id: str
    model: str | None
    version: str | None
    reply_to: str | None  # None: no usable reply target, the outcome goes to the dead-letter topic
    content_type: str
    deadline_ms: int | None
    received: float  # time.monotonic() when consumed
    answered: bool = False  # an outcome was handed to Replies: never a second one
    settled: bool = False  # that outcome is durable
    held: int = 0  # bytes of its outcome, expected or encoded, in memory until it is durable
    # Bytes of the record it holds (value, key, headers' names and values): counted against
    # max_in_flight_bytes while in flight, as a record's headers can be as large as its value.
    size: int = 0
    tracking: object = None  # the offset tracker's token for this record's partition

    def expired(self, now_ms: int) -> bool:
        return self.deadline_ms is not None and now_ms >= self.deadline_ms


# The headers routing reads; others pass through untouched (and need not be UTF-8). The
# deadline is read per record; the others decide a route, cached.
_ROUTING = frozenset(
    (headers.MODEL, headers.VERSION, headers.REPLY_TO, headers.DEADLINE_MS, headers.CONTENT_TYPE)
)
_ROUTE_CACHE = 1024
# A routing header's value at most: a topic name's limit and more than any model name or
# version needs. Routes are cached by their headers' values, and a model's name goes into
# each of its results' headers: unbounded, a few records could pin gigabytes there.
MAX_ROUTING_BYTES = 255


@dataclass(frozen=True, slots=True)
class Route:
    """What a topic and its routing headers (but the deadline) decide, whatever the body."""

    model: str | None
    version: str | None
    reply_to: str | None
    content_type: str
    rejection: Rejection | None  # found before the size check
    late_rejection: Rejection | None = None  # found after it (and after the deadline's)


class _Read(NamedTuple):
    """What a record's headers decide: its route, its deadline, and why that is unusable."""

    route: Route
    deadline_ms: int | None
    bad_deadline: Rejection | None
    headers_size: int  # bytes of the headers' names and values: held while in flight


class Router:
    """Turns records into tickets. Built once; `ticket()` does no configuration look-ups."""

    def __init__(
        self,
        topic_models: Mapping[str, str | None],
        *,
        reply_topic_pattern: str,
        default_reply_to: str,
        max_message_bytes: int,
        redis_enabled: bool,
        forbidden_reply_topics: Collection[str],
    ) -> None:
        self._topic_models = dict(topic_models)
        self._reply_topic = re.compile(reply_topic_pattern)
        self._default_reply_to = default_reply_to or None
        self._max_bytes = max_message_bytes
        self._redis = redis_enabled
        self._forbidden = frozenset(forbidden_reply_topics)
        # A producer sends the same routing headers again and again: decide each distinct
        # (topic, routing headers) once.
        self._routes: dict[tuple[str, tuple[Any, ...]], Route] = {}
        # Consecutive records of one producer usually carry the very same headers (deadline
        # included): the last record's topic and headers, compared whole in C, and what they
        # decided.
        self._last: tuple[str, Sequence[tuple[str, bytes | None]], _Read] | None = None

    def ticket(
        self, record: Record, tp: TopicPartition, received: float
    ) -> tuple[Ticket, Rejection | None]:
        """The record's ticket (`tp` its partition, `received` when its fetch came in), with
        the reason it cannot be served, if any."""
        route, deadline_ms, bad_deadline, held = self._read(tp.topic, record.headers)
        value = record.value or b""
        ticket = Ticket(
            tp,
            record.offset,
            record.key,
            value,
            record.headers,
            _fallback_id(record, tp),
            route.model,
            route.version,
            route.reply_to,
            route.content_type,
            deadline_ms,
            received,
            size=len(value) + len(record.key or b"") + held,
        )
        if route.rejection:
            return ticket, route.rejection
        if len(value) > self._max_bytes:
            return ticket, Rejection(
                ErrorCode.TOO_LARGE, f"message of {len(value)} bytes exceeds {self._max_bytes}"
            )
        return ticket, bad_deadline or route.late_rejection

    def clean_tickets(
        self, records: Sequence[Record], tp: TopicPartition, received: float
    ) -> list[Ticket] | None:
        """Tickets for a run of records with the same headers (`run_end`) when routing finds
        nothing wrong with any of them, each without its id (`fallback_id` or the body's);
        None: some record must go the record-by-record way, for its rejection."""
        route, deadline_ms, bad_deadline, held = self._read(tp.topic, records[0].headers)
        if route.rejection or bad_deadline or route.late_rejection:
            return None
        model, version, reply_to = route.model, route.version, route.reply_to
        content_type = route.content_type
        values = [record.value or b"" for record in records]
        if max(map(len, values)) > self._max_bytes:
            return None
        return [
            Ticket(
                tp,
                record.offset,
                record.key,
                value,
                record.headers,
                "",
                model,
                version,
                reply_to,
                content_type,
                deadline_ms,
                received,
                size=len(value) + len(record.key or b"") + held,
            )
            for record, value in zip(records, values, strict=True)
        ]

    def _read(self, topic: str, record_headers: Sequence[tuple[str, bytes | None]]) -> _Read:
        last = self._last
        if last is not None and last[1] == record_headers and last[0] == topic:
            return last[2]
        read = self._read_headers(topic, record_headers)
        self._last = (topic, record_headers, read)  # a record's own, never changed
        return read

    def _read_headers(
        self, topic: str, record_headers: Sequence[tuple[str, bytes | None]]
    ) -> _Read:
        routing, deadline, size = [], None, 0
        for pair in record_headers:
            name, value = pair
            size += len(name) + len(value or b"")
            if name in _ROUTING:
                if name == headers.DEADLINE_MS:
                    deadline = value
                else:
                    routing.append(pair)
        if len(routing) > len(_ROUTING) - 1:
            # A name repeated: the last value decides (as Java's `lastHeader` reads them), and
            # a route's key holds four short values at most, however many a record repeats.
            routing = list(dict(routing).items())
        deadline_ms, bad_deadline = (None, None) if deadline is None else _deadline(deadline)
        return _Read(self._cached_route(topic, routing), deadline_ms, bad_deadline, size)

    def _cached_route(self, topic: str, routing: list[tuple[str, bytes | None]]) -> Route:
        if any(raw is not None and len(raw) > MAX_ROUTING_BYTES for _, raw in routing):
            return self._route(topic, routing)  # refused, and not worth keeping
        key = (topic, tuple(routing))
        try:
            route = self._routes.get(key)
        except TypeError:  # an unhashable header value: decide without the cache
            return self._route(topic, routing)
        if route is None:
            route = self._route(topic, routing)
            if len(self._routes) >= _ROUTE_CACHE:
                self._routes.clear()
            self._routes[key] = route
        return route

    def _route(self, topic: str, routing: list[tuple[str, bytes | None]]) -> Route:
        fields: dict[str, str] = {}
        # Headers whose value is unusable: over the size limit (True) or not UTF-8 (False).
        # The last value of a name decides, whether the values before it were usable or not.
        unusable: dict[str, bool] = {}
        for name, raw in routing:
            fields.pop(name, None)
            unusable.pop(name, None)
            if raw is None:  # a null value is the same as absent
                continue
            if len(raw) > MAX_ROUTING_BYTES:  # refused below, and read no further
                unusable[name] = True
                continue
            try:
                fields[name] = raw.decode()
            except UnicodeDecodeError:
                unusable[name] = False
        oversized = next((name for name, over in unusable.items() if over), None)
        undecodable = next((name for name, over in unusable.items() if not over), None)
        model = fields.get(headers.MODEL) or self._topic_models.get(topic)
        version = fields.get(headers.VERSION) or None
        content_type = fields.get(headers.CONTENT_TYPE, JSON)
        supported = content_type in CONTENT_TYPES
        reply_to, rejection = self._reply_target(fields.get(headers.REPLY_TO))
        if headers.REPLY_TO in unusable:  # asked for, unusable: as a topic not allowed
            why = f"over {MAX_ROUTING_BYTES} bytes" if unusable[headers.REPLY_TO] else "not UTF-8"
            reply_to = None
            rejection = Rejection(
                ErrorCode.INVALID_REPLY_TO, f"header {headers.REPLY_TO!r} is {why}"
            )
        if not rejection and oversized:
            rejection = _too_long(oversized, ErrorCode.INVALID_REQUEST)
        if not rejection and undecodable:
            rejection = Rejection(ErrorCode.INVALID_REQUEST, f"header {undecodable!r} is not UTF-8")
        if not rejection and not supported:
            rejection = Rejection(
                ErrorCode.UNSUPPORTED_CONTENT_TYPE,
                f"content-type {content_type!r} is not one of {', '.join(CONTENT_TYPES)}",
            )
        late = None
        if model is None:
            late = Rejection(
                ErrorCode.MISSING_ROUTE, f"topic {topic!r} is shared: set {headers.MODEL}"
            )
        # An unsupported content type still answers, in JSON.
        return Route(model, version, reply_to, content_type if supported else JSON, rejection, late)

    def _reply_target(self, requested: str | None) -> tuple[str | None, Rejection | None]:
        target = requested or self._default_reply_to
        if target is None:
            return None, Rejection(ErrorCode.INVALID_REPLY_TO, f"no {headers.REPLY_TO} header")
        if target == REPLY_TO_REDIS:
            if self._redis:
                return target, None
            return None, Rejection(ErrorCode.INVALID_REPLY_TO, "Redis replies are not configured")
        if not self._reply_topic.fullmatch(target) or target in self._forbidden:
            return None, Rejection(
                ErrorCode.INVALID_REPLY_TO, f"reply topic {target!r} is not allowed"
            )
        return target, None


_LONG = re.compile(rb"-?[0-9]{1,19}")


def _too_long(header: str, code: ErrorCode) -> Rejection:
    return Rejection(code, f"header {header!r} is over {MAX_ROUTING_BYTES} bytes")


def _deadline(raw: bytes) -> tuple[int | None, Rejection | None]:
    """The deadline header's value (epoch ms), or why it is unusable. Only what a Kafka
    client writes for a long is taken: ASCII digits, maybe a minus sign (no spaces, `_` or
    other scripts' digits, which `int` would take)."""
    if len(raw) > MAX_ROUTING_BYTES:
        return None, _too_long(headers.DEADLINE_MS, ErrorCode.INVALID_REQUEST)
    if _LONG.fullmatch(raw):
        return int(raw), None
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return None, Rejection(
            ErrorCode.INVALID_REQUEST, f"header {headers.DEADLINE_MS!r} is not UTF-8"
        )
    return None, Rejection(
        ErrorCode.INVALID_REQUEST, f"{headers.DEADLINE_MS} {text!r} is not an integer"
    )


def unroutable(record: Record, tp: TopicPartition) -> Ticket:
    """A ticket for a record that routing itself failed on: its outcome is a dead letter."""
    return Ticket(
        tp=tp,
        offset=record.offset,
        key=record.key,
        value=record.value or b"",
        headers=[(k, v) for k, v in record.headers if isinstance(k, str)],
        request_id=_fallback_id(record, tp),
        model=None,
        version=None,
        reply_to=None,
        content_type=JSON,
        deadline_ms=None,
        received=time.monotonic(),
        size=len(record.value or b"") + len(record.key or b""),
    )


def run_end(records: Sequence[Record], start: int) -> int:
    """One past the last of the records from `start` on that carry the same headers as the
    record at `start`: records that routing decides alike (a producer's batch, usually)."""
    first, end, count = records[start].headers, start + 1, len(records)
    while end < count and records[end].headers == first:
        end += 1
    return end


def _fallback_id(record: Record, tp: TopicPartition) -> str:
    """The Kafka key where it could be a body's id (`key_id`), else the record's position:
    stable across redeliveries."""
    return _id_of(record.key, tp.topic, tp.partition, record.offset)


def fallback_id(ticket: Ticket) -> str:
    """A ticket's id when its body gives none: as `_fallback_id` gives a record's."""
    return _id_of(ticket.key, ticket.tp.topic, ticket.tp.partition, ticket.offset)


def _id_of(key: bytes | None, topic: str, partition: int, offset: int) -> str:
    """The key as text where it could be a body's id, else the record's position: a key that
    could not be an id makes no Redis key or reply header of any length."""
    return key_id(key) or f"{topic}-{partition}-{offset}"
