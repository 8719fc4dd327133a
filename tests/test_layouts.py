"""Layout reads: a body read by its layout must give what the full decode gives, for every
body of the learned length, valid or not."""

from __future__ import annotations

import random

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from surge.producers.requests import request_body
from surge.schemas import MSGPACK, ErrorCode
from surge.workers import intake as intake_module
from surge.workers.intake import _TOGETHER, Intake, Job, RawRows, admit
from surge.workers.layouts import MAX_FIXED_BYTES, Layout, learn
from surge.workers.runtimes import TensorSpec
from surge.workers.tickets import Rejection, Ticket
from tests.helpers import make_ticket

SPECS = [TensorSpec("x", "FP32", (4,))]
LIMITS = {"max_rows": 8, "max_elements": 1 << 16}


def _body(request_id: str = "req-0001", rows: int = 1, fill: float = 1.0) -> bytes:
    return request_body({"x": np.full((rows, 4), fill, np.float32)}, request_id, MSGPACK)


def _outcome(result: Job | Rejection) -> tuple[object, ...]:
    """What a result says, comparable across the two ways of admitting."""
    if isinstance(result, Rejection):
        return ("rejected", result.code)
    inputs = {name: bytes(data) for name, data in result.inputs.items()}
    return ("job", result.ticket.request_id, result.rows, inputs, result.outputs)


def _outcomes(
    tickets: list[Ticket], admitted: tuple[list[Job], list[tuple[Ticket, Rejection]]]
) -> list[tuple[object, ...]]:
    """Each ticket's outcome from `Intake.admit_all`, in the tickets' order: a run's requests
    each with their own rows."""
    jobs, rejected = admitted
    outcomes: dict[int, tuple[object, ...]] = {}
    for job in jobs:
        for index, ticket in enumerate(job.tickets):
            inputs = {
                name: rows.bodies[index][rows.start : rows.end]
                if isinstance(rows, RawRows)
                else bytes(rows)
                for name, rows in job.inputs.items()
            }
            outcomes[id(ticket)] = ("job", ticket.request_id, job.each, inputs, job.outputs)
    for ticket, rejection in rejected:
        outcomes[id(ticket)] = ("rejected", rejection.code)
    assert sum(len(job.tickets) for job in jobs) + len(rejected) == len(outcomes) == len(tickets)
    return [outcomes[id(ticket)] for ticket in tickets]


def _both(intake: Intake, body: bytes) -> tuple[tuple[object, ...], tuple[object, ...]]:
    full = admit(make_ticket(body, MSGPACK), SPECS, [], **LIMITS)
    return _outcome(intake.admit(make_ticket(body, MSGPACK))), _outcome(full)


def test_a_learned_layout_reads_the_id_and_rows_of_later_bodies() -> None:
    intake = Intake(SPECS, [], **LIMITS)
    intake.admit(make_ticket(_body("req-0001", rows=2), MSGPACK))
    later = _body("req-0002", rows=2, fill=3.0)
    job = intake.admit(make_ticket(later, MSGPACK))
    assert isinstance(job, Job)
    assert job.ticket.request_id == "req-0002"
    assert job.rows == 2
    assert np.frombuffer(job.inputs["x"], np.float32).tolist() == [3.0] * 8
    layout = learn(later)
    assert layout is not None
    assert layout.read(later) is not None


def test_later_bodies_skip_the_full_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    intake = Intake(SPECS, [], **LIMITS)
    intake.admit(make_ticket(_body("req-0001"), MSGPACK))
    full_decodes = []
    monkeypatch.setattr(intake_module, "admit", lambda *a, **k: full_decodes.append(a))
    for n in range(2, 10):
        assert isinstance(intake.admit(make_ticket(_body(f"req-000{n}"), MSGPACK)), Job)
    assert full_decodes == []
    intake.admit(make_ticket(_body("req-00010"), MSGPACK))  # another length: the full way
    assert len(full_decodes) == 1


def test_a_body_without_an_id_keeps_the_fallback_id() -> None:
    body = msgspec.msgpack.encode(
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": bytes(16)}]}
    )
    layout = learn(body)
    assert layout is not None
    assert layout.id_at is None
    intake = Intake(SPECS, [], **LIMITS)
    for _ in range(2):
        job = intake.admit(make_ticket(body, MSGPACK))
        assert isinstance(job, Job)
        assert job.ticket.request_id == "k"


def test_an_id_that_is_not_utf8_is_refused_as_the_full_decode_refuses_it() -> None:
    intake = Intake(SPECS, [], **LIMITS)
    good = _body("idé1")
    intake.admit(make_ticket(good, MSGPACK))
    raw_id = "idé1".encode()
    bad = good.replace(raw_id, b"id\xff\xfe1")
    assert len(bad) == len(good)
    laid_out, full = _both(intake, bad)
    assert laid_out == full == ("rejected", ErrorCode.BAD_ENCODING)


def test_bodies_that_cannot_be_pinned_down_get_no_layout() -> None:
    # The id written with a longer string header than needed: found nowhere as expected.
    long_header = msgspec.msgpack.encode(
        {"id": "ab", "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": b""}]}
    ).replace(b"\xa2id\xa2ab", b"\xa2id\xd9\x02ab")
    assert learn(long_header) is None
    # The id's bytes also appear elsewhere in the body: ambiguous.
    ambiguous = msgspec.msgpack.encode(
        {
            "id": "ab",
            "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": bytes(16)}],
            "parameters": {"note": {"id": "ab"}},
        }
    )
    assert learn(ambiguous) is None
    # Values rather than raw bytes.
    values = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0] * 4}]}
    assert learn(msgspec.msgpack.encode(values)) is None
    assert learn(b"\xc1") is None
    # Much more around the tensor than in it: a layout would hold all of it.
    padded = msgspec.msgpack.encode(
        {
            "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": bytes(16)}],
            "parameters": {"note": "x" * MAX_FIXED_BYTES},
        }
    )
    assert learn(padded) is None


def test_bodies_refused_at_first_sight_teach_nothing() -> None:
    intake = Intake(SPECS, [], **LIMITS)
    good = _body("req-0001")
    wrong_name = good.replace(b"\xa1x", b"\xa1y")
    assert isinstance(intake.admit(make_ticket(wrong_name, MSGPACK)), Rejection)
    assert isinstance(intake.admit(make_ticket(good, MSGPACK)), Job)
    laid_out, full = _both(intake, _body("req-0002"))
    assert laid_out == full
    assert laid_out[0] == "job"


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(1, 3),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
)
def test_any_body_of_the_learned_length_reads_as_the_full_decode_reads_it(
    rows: int, flips: list[tuple[int, int]]
) -> None:
    intake = Intake(SPECS, [], **LIMITS)
    learned = _body("req-0001", rows=rows)
    assert learn(learned) is not None
    intake.admit(make_ticket(learned, MSGPACK))
    mutated = bytearray(_body("req-0002", rows=rows, fill=2.0))
    for at, value in flips:
        mutated[at % len(mutated)] = value
    laid_out, full = _both(intake, bytes(mutated))
    assert laid_out == full


def test_bool_rows_other_than_zero_and_one_are_refused_however_they_come() -> None:
    """Raw BOOL rows are checked, so they never take the fast ways that pass rows unread."""
    specs = [TensorSpec("x", "BOOL", (4,))]
    intake = Intake(specs, [], **LIMITS)
    good = request_body({"x": np.array([[0, 1, 1, 0]], np.bool_)}, "req-1", MSGPACK)
    bad = good.replace(b"\x00\x01\x01\x00", b"\x00\x01\x02\xff")
    assert len(bad) == len(good)
    for body in (good, bad, good, bad):  # the second time round, any layout is learned
        result = intake.admit(make_ticket(body, MSGPACK))
        if body is good:
            assert isinstance(result, Job)
            assert np.asarray(result.inputs["x"]).tolist() == [[False, True, True, False]]
        else:
            assert isinstance(result, Rejection)
            assert result.code == ErrorCode.INVALID_INPUT


def _tickets(bodies: list[bytes]) -> list:
    """Tickets of a run, as `Router.clean_tickets` makes them: no id yet, keys distinct."""
    tickets = [make_ticket(body, MSGPACK) for body in bodies]
    for index, ticket in enumerate(tickets):
        ticket.key, ticket.offset, ticket.request_id = f"key-{index}".encode(), index, ""
    return tickets


def _one_by_one(bodies: list[bytes]) -> list[tuple[object, ...]]:
    """What `admit` gives each body alone, with the id a ticket falls back to."""
    outcomes = []
    for ticket in _tickets(bodies):
        ticket.request_id = ticket.key.decode()
        outcomes.append(_outcome(admit(ticket, SPECS, [], **LIMITS)))
    return outcomes


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    st.sampled_from([2, 5, _TOGETHER, _TOGETHER + 3]),  # one by one, and as one array
)
def test_a_run_read_together_gives_what_each_body_gives_alone(
    flips: list[tuple[int, int, int]], count: int
) -> None:
    """Same-length bodies, some of them altered anywhere: read as one array where all are
    laid out alike, one by one where not, each outcome is the full decode's."""
    intake = Intake(SPECS, [], **LIMITS)
    intake.admit(make_ticket(_body("req-0000"), MSGPACK))
    bodies = [bytearray(_body(f"req-{n:04d}", fill=float(n))) for n in range(1, count + 1)]
    for which, at, value in flips:
        body = bodies[which % count]
        body[at % len(body)] = value
    run = [bytes(body) for body in bodies]
    tickets = _tickets(run)
    assert _outcomes(tickets, intake.admit_all(tickets)) == _one_by_one(run)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from([7, 9]), min_size=1, max_size=_TOGETHER + 2),
    st.randoms(use_true_random=False),
    st.lists(
        st.tuples(st.integers(0, 100), st.integers(0, 10_000), st.integers(0, 255)), max_size=3
    ),
)
def test_a_run_of_several_body_lengths_gives_what_each_body_gives_alone(
    others: list[int], shuffle: random.Random, flips: list[tuple[int, int, int]]
) -> None:
    """Bodies of a few lengths interleaved (ids of other widths; the 9-wide ones never seen
    before), some altered: each length's group is read as one array or one by one, and every
    outcome is the full decode's, in the run's order."""
    intake = Intake(SPECS, [], **LIMITS)
    intake.admit(make_ticket(_body("a" * 4), MSGPACK))
    intake.admit(make_ticket(_body("b" * 7), MSGPACK))
    widths = [4] * (_TOGETHER + 1) + others  # one group at least is read together
    shuffle.shuffle(widths)
    bodies = [bytearray(_body(f"{n:0{width}d}", fill=float(n))) for n, width in enumerate(widths)]
    for which, at, value in flips:
        body = bodies[which % len(bodies)]
        body[at % len(body)] = value
    run = [bytes(body) for body in bodies]
    tickets = _tickets(run)
    admitted = intake.admit_all(tickets)
    assert _outcomes(tickets, admitted) == _one_by_one(run)
    firsts = [tickets.index(job.ticket) for job in admitted[0]]
    assert firsts == sorted(firsts)  # queued in the order their requests came


def test_a_run_laid_out_alike_is_read_as_one_array(monkeypatch: pytest.MonkeyPatch) -> None:
    intake = Intake(SPECS, [], **LIMITS)
    intake.admit(make_ticket(_body("req-0000"), MSGPACK))
    monkeypatch.setattr(intake_module, "admit", pytest.fail)  # no full decode
    monkeypatch.setattr(Layout, "read", pytest.fail)  # nor one body at a time
    numbers = range(1, _TOGETHER + 1)
    tickets = _tickets([_body(f"req-{n:04d}", fill=float(n)) for n in numbers])
    jobs, rejected = intake.admit_all(tickets)
    assert not rejected
    (job,) = jobs  # one job for the whole run
    assert list(job.tickets) == tickets
    assert (job.rows, job.each) == (len(tickets), 1)
    assert [ticket.request_id for ticket in tickets] == [f"req-{n:04d}" for n in numbers]
    rows = job.inputs["x"]
    assert isinstance(rows, RawRows)
    assert np.frombuffer(rows.block(), np.float32).reshape(-1, 4).tolist() == [
        [float(n)] * 4 for n in numbers
    ]


def test_a_run_without_ids_or_with_ids_beyond_ascii_reads_as_each_alone() -> None:
    no_id = msgspec.msgpack.encode(
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": bytes(16)}]}
    )
    accented = [_body(f"réq-{n:02d}") for n in range(_TOGETHER)]
    for run in ([no_id] * _TOGETHER, accented):
        intake = Intake(SPECS, [], **LIMITS)
        intake.admit(make_ticket(run[0], MSGPACK))
        tickets = _tickets(run)
        assert _outcomes(tickets, intake.admit_all(tickets)) == _one_by_one(run)
    layout = learn(accented[0])
    assert layout is not None
    assert layout.read_all(accented) is None  # UTF-8 past ASCII: one by one
