"""The ledger's bounds: request bodies and the encoded results waiting to be written both count
against max_in_flight_bytes, until each result is durable (or its partition is given away)."""

from __future__ import annotations

import asyncio
import contextlib

from surge.schemas import ErrorCode
from surge.workers.ledger import Ledger
from surge.workers.replies import Replies
from surge.workers.tickets import Rejection
from surge.workers.writes import Write
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
    assert ledger.bytes == 100
    assert not ledger.full

    replies.ok_body(ticket, b"r" * 2_000)  # a model with large outputs

    assert ledger.bytes == 2_100
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
    ledger.finish(ticket)
    assert ledger.bytes == 510  # decided, still in memory
    ledger.release(ticket)
    assert (ledger.records, ledger.bytes) == (0, 0)
    ledger.settle(ticket)  # settling a released ticket again changes nothing
    assert (ledger.records, ledger.bytes) == (0, 0)


async def test_callers_that_stop_waiting_for_progress_leave_no_waiter_behind() -> None:
    """An idle worker asks for progress every few seconds, and gives up waiting each time."""
    ledger = Ledger(max_records=10, max_bytes=1 << 20)
    for _ in range(100):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ledger.progress(), 0.001)
    assert not ledger._waiters
