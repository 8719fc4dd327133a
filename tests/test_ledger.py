"""The ledger's bounds: request bodies and the encoded results waiting to be written both count
against max_in_flight_bytes, until each result is durable (or its partition is given away)."""

from __future__ import annotations

import asyncio
import contextlib

from aiokafka.errors import TopicAuthorizationFailedError
from prometheus_client import REGISTRY

from surge.schemas import ErrorCode
from surge.workers.ledger import Ledger
from surge.workers.replies import Replies
from surge.workers.tickets import Rejection
from surge.workers.writes import RetryPolicy, Write
from tests.helpers import make_ticket


def _replies(ledger: Ledger, writes: list[Write]) -> Replies:
    return Replies(
        writes.append,
        None,
        ledger,
        dead_letter_topic="dead",
        redis_ttl_s=60,
        redis_prefix="",
        on_crash=lambda exc: None,
    )


def test_a_result_waiting_to_be_written_counts_against_the_bytes_bound() -> None:
    ledger, writes = Ledger(max_records=100, max_bytes=1_000), []
    replies = _replies(ledger, writes)
    ticket = make_ticket(b"x" * 100)
    ledger.admit(ticket)
    assert ledger.bytes == 101  # its value and its one-byte key
    assert not ledger.full

    replies.ok_body(ticket, b"r" * 2_000)  # a model with large outputs

    assert ledger.bytes == 2_101
    assert ledger.full, "a worker whose results pile up must stop fetching"
    ledger.settle_all([write.ticket for write in writes])
    assert (ledger.records, ledger.bytes) == (0, 0)
    assert ledger.has_room


def test_error_results_and_dead_letters_are_released_whole() -> None:
    ledger, writes = Ledger(max_records=100, max_bytes=1 << 20), []
    replies = _replies(ledger, writes)
    answered, unanswerable = make_ticket(b"{}"), make_ticket(b"{}")
    unanswerable.reply_to = None  # a dead letter: it carries the request's own bytes
    for ticket in (answered, unanswerable):
        ledger.admit(ticket)
        replies.error(ticket, Rejection(ErrorCode.INVALID_INPUT, "bad"))
    assert ledger.bytes > 4  # the error result's body is held as well
    ledger.settle_all([write.ticket for write in writes])
    assert (ledger.records, ledger.bytes) == (0, 0)


def test_an_outcome_decided_then_released_frees_its_result_too() -> None:
    """Exactly-once: an outcome is finished when buffered for its transaction, released once
    the transaction commits or the partition is given away."""
    ledger, writes = Ledger(max_records=100, max_bytes=1 << 20), []
    replies = _replies(ledger, writes)
    ticket = make_ticket(b"x" * 10)
    ledger.admit(ticket)
    replies.ok_body(ticket, b"r" * 500)
    ledger.finish_all([ticket])
    assert ledger.bytes == 511  # decided, still in memory
    ledger.release_all([ticket])
    assert (ledger.records, ledger.bytes) == (0, 0)
    ledger.settle_all([ticket])  # settling a released ticket again changes nothing
    assert (ledger.records, ledger.bytes) == (0, 0)


def test_a_record_counts_with_its_key_and_headers() -> None:
    """A record's headers can be as large as its value: a bound on values alone would let
    20,000 records with a megabyte of headers each in."""
    ledger = Ledger(max_records=100, max_bytes=1 << 20)
    ticket = make_ticket(b"{}", key=b"k" * 10, headers=[("h", b"v" * (1 << 20))])
    ledger.admit(ticket)
    assert ledger.bytes == 2 + 10 + 1 + (1 << 20)
    assert ledger.full
    ledger.settle_all([ticket])
    assert (ledger.records, ledger.bytes) == (0, 0)


def test_room_is_counted_in_records_of_a_size_and_never_below_one() -> None:
    ledger = Ledger(max_records=10, max_bytes=1_000)
    assert ledger.room_for(50, 100) == 10
    assert ledger.room_for(50, 300) == 3
    assert ledger.room_for(2, 0) == 2
    assert ledger.room_for(50, 5_000) == 1  # larger than the whole bound: alone


async def test_callers_that_stop_waiting_for_progress_leave_no_waiter_behind() -> None:
    """An idle worker asks for progress every few seconds, and gives up waiting each time."""
    ledger = Ledger(max_records=10, max_bytes=1 << 20)
    for _ in range(100):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ledger.progress(), 0.001)
    assert not ledger._waiters


def test_an_error_result_its_target_refuses_counts_once_as_an_error() -> None:
    """surge_errors_total counts requests; the refused write is a dead letter, counted there."""

    def count(metric: str, code: str) -> float:
        return REGISTRY.get_sample_value(metric, {"code": code}) or 0.0

    before = {code: count("surge_errors_total", code) for code in ("invalid_input", "reply_failed")}
    letters = count("surge_dead_letters_total", "reply_failed")
    ledger, writes = Ledger(max_records=100, max_bytes=1 << 20), []
    ticket = make_ticket(b"{}")
    ledger.admit(ticket)
    _replies(ledger, writes).error(ticket, Rejection(ErrorCode.INVALID_INPUT, "bad"))
    letter = RetryPolicy("dead", 60, lambda exc: None).after(
        writes[0], TopicAuthorizationFailedError()
    )
    assert letter.dead_letter
    assert count("surge_errors_total", "invalid_input") == before["invalid_input"] + 1
    assert count("surge_errors_total", "reply_failed") == before["reply_failed"]
    assert count("surge_dead_letters_total", "reply_failed") == letters + 1
