"""Tickets: what a worker knows of a consumed record before decoding its body.

Routing reads headers only. A ticket always comes back, with a rejection when the record
cannot be served, so every record ends as a result or a dead letter.
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from aiokafka import TopicPartition

from surge.schemas import JSON, ErrorCode, headers
from surge.schemas.headers import CONTENT_TYPES, REPLY_TO_REDIS


class Record(Protocol):
    """The parts of an aiokafka ConsumerRecord a worker reads."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes | None]]


@dataclass(frozen=True, slots=True)
class Rejection:
    code: ErrorCode
    message: str


@dataclass(slots=True, eq=False)
class Ticket:
    """One consumed record: where it came from, where its outcome goes, and its progress."""

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
    tracking: object = None  # the offset tracker's token for this record's partition

    def expired(self, now_ms: int) -> bool:
        return self.deadline_ms is not None and now_ms >= self.deadline_ms


# The headers routing reads; others pass through untouched (and need not be UTF-8).
_ROUTING = frozenset(
    (headers.MODEL, headers.VERSION, headers.REPLY_TO, headers.DEADLINE_MS, headers.CONTENT_TYPE)
)
_TARGET_CACHE = 1024


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
        # Reply targets repeat (a service's reply topic): check each distinct one once.
        self._targets: dict[str | None, tuple[str | None, Rejection | None]] = {}

    def ticket(self, record: Record) -> tuple[Ticket, Rejection | None]:
        fields: dict[str, str] = {}
        undecodable = None
        for name, raw in record.headers:
            if name not in _ROUTING or raw is None:  # a null value is the same as absent
                continue
            try:
                fields[name] = raw.decode()
            except UnicodeDecodeError:
                undecodable = name
        value = record.value or b""
        ticket = Ticket(
            tp=TopicPartition(record.topic, record.partition),
            offset=record.offset,
            key=record.key,
            value=value,
            headers=record.headers,
            request_id=_fallback_id(record),
            model=fields.get(headers.MODEL) or self._topic_models.get(record.topic),
            version=fields.get(headers.VERSION) or None,
            reply_to=None,
            content_type=JSON,  # until the header proves to name a supported one
            deadline_ms=None,
            received=time.monotonic(),
        )
        content_type = fields.get(headers.CONTENT_TYPE, JSON)
        if content_type in CONTENT_TYPES:
            ticket.content_type = content_type
        requested = fields.get(headers.REPLY_TO)
        target = self._targets.get(requested)
        if target is None:
            target = self._reply_target(requested)
            if len(self._targets) >= _TARGET_CACHE:
                self._targets.clear()
            self._targets[requested] = target
        ticket.reply_to, rejection = target
        if rejection:
            return ticket, rejection
        if undecodable:
            return ticket, Rejection(
                ErrorCode.INVALID_REQUEST, f"header {undecodable!r} is not UTF-8"
            )
        if content_type not in CONTENT_TYPES:
            return ticket, Rejection(
                ErrorCode.UNSUPPORTED_CONTENT_TYPE,
                f"content-type {content_type!r} is not one of {', '.join(CONTENT_TYPES)}",
            )
        if len(value) > self._max_bytes:
            return ticket, Rejection(
                ErrorCode.TOO_LARGE, f"message of {len(value)} bytes exceeds {self._max_bytes}"
            )
        deadline = fields.get(headers.DEADLINE_MS)
        if deadline is not None:
            try:
                ticket.deadline_ms = int(deadline)
            except ValueError:
                return ticket, Rejection(
                    ErrorCode.INVALID_REQUEST,
                    f"{headers.DEADLINE_MS} {deadline!r} is not an integer",
                )
        if ticket.model is None:
            return ticket, Rejection(
                ErrorCode.MISSING_ROUTE, f"topic {record.topic!r} is shared: set {headers.MODEL}"
            )
        return ticket, None

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


def unroutable(record: Record) -> Ticket:
    """A ticket for a record that routing itself failed on: its outcome is a dead letter."""
    return Ticket(
        tp=TopicPartition(record.topic, record.partition),
        offset=record.offset,
        key=record.key,
        value=record.value or b"",
        headers=[(k, v) for k, v in record.headers if isinstance(k, str)],
        request_id=_fallback_id(record),
        model=None,
        version=None,
        reply_to=None,
        content_type=JSON,
        deadline_ms=None,
        received=time.monotonic(),
    )


def _fallback_id(record: Record) -> str:
    """The Kafka key, else the record's position: stable across redeliveries."""
    if record.key:
        try:
            return record.key.decode()
        except UnicodeDecodeError:
            pass
    return f"{record.topic}-{record.partition}-{record.offset}"
