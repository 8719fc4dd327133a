"""The batcher's choices, on plain objects: which requests share a model call, and where
the model runs."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import CancelledError as FutureCancelled
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY

from surge.config import ModelConfig
from surge.schemas import (
    JSON,
    MSGPACK,
    ErrorCode,
    InferenceResponse,
    decode_response,
    encode,
    headers,
    row_tensors,
    to_array,
)
from surge.workers.batcher import _INLINE_AFTER, Batcher, ModelHung
from surge.workers.batching import CallCost, best_run, group_by_shape, stack
from surge.workers.intake import Job, RawRows
from surge.workers.ledger import Ledger
from surge.workers.replies import Replies
from surge.workers.runtimes import DeviceFailed, TensorSpec
from surge.workers.tickets import Rejection
from surge.workers.writes import Write
from tests.helpers import make_ticket

# What the batchers and replies of a test reported as crashes, from a callback asyncio calls
# (where `pytest.fail` would only be logged): the test fails on any.
CRASHES: list[BaseException] = []


@pytest.fixture(autouse=True)
def _no_crash() -> Iterator[None]:
    CRASHES.clear()
    yield
    assert not CRASHES, f"crashed: {CRASHES!r}"


class _Embedder:
    """Records every batch it runs, padded as the batcher padded it."""

    inputs = (TensorSpec("ids", "INT64", (-1,), pad_value=0),)
    outputs = (TensorSpec("embedding", "FP32", (2,)),)

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["ids"]
        self.batches.append(ids)
        return {"embedding": np.zeros((ids.shape[0], 2), np.float32)}


class _Answers:
    def __init__(self) -> None:
        self.answered: list[Any] = []
        self.failed: list[Any] = []
        self.bodies: dict[str, bytes] = {}
        self.joined = 0  # bodies joined from frames

    def ok(self, ticket: Any, response: Any) -> None:
        self.answered.append(ticket)
        self.bodies[ticket.request_id] = encode(response, ticket.content_type)

    def ok_body(self, ticket: Any, body: bytes) -> None:
        self.answered.append(ticket)
        self.bodies[ticket.request_id] = body
        self.joined += 1

    def ok_bodies(self, tickets: list[Any], bodies: list[bytes]) -> None:
        for ticket, body in zip(tickets, bodies, strict=True):
            self.ok_body(ticket, body)

    def error(self, ticket: Any, rejection: Any) -> None:
        self.failed.append(rejection)


def _batcher(
    model: Any,
    answers: _Answers,
    config: ModelConfig | None = None,
    *,
    budget: float = 10,
    max_elements: int = 1 << 22,
) -> Batcher:
    return Batcher(
        model="embedder",
        version="1",
        runtime=model,
        config=config or ModelConfig(max_batch_size=8, max_batch_delay_ms=1),
        executor=ThreadPoolExecutor(1, thread_name_prefix="model"),
        replies=answers,  # type: ignore[arg-type]
        time_budget_s=budget,
        max_elements=max_elements,
    )


def _queue(batcher: Batcher, lengths: list[int]) -> None:
    """One single-row request per length, ids numbered from 1 in arrival order."""
    for i, length in enumerate(lengths):
        batcher.put(Job(make_ticket(b"{}"), {"ids": np.full((1, length), i + 1)}, 1, None))


async def test_a_backlog_of_padded_inputs_is_batched_by_length() -> None:
    model, answers = _Embedder(), _Answers()
    batcher = _batcher(model, answers)
    lengths = [3, 30] * 32  # a backlog alternating short and long rows
    _queue(batcher, lengths)
    crashes: list[BaseException] = []
    batcher.start(on_crash=crashes.append)
    async with asyncio.timeout(30):
        while len(answers.answered) + len(answers.failed) < len(lengths) and not crashes:
            await asyncio.sleep(0.01)
    await batcher.close()
    assert not crashes
    assert not answers.failed

    assert model.batches[0][0, 0] == 1  # the oldest request still goes first
    padded = sum(batch.size for batch in model.batches)
    assert padded < 1.2 * sum(lengths)  # first come, first served would pad to 30 every time


def _padded_rows(window: int, lengths: list[int], batch: int = 8) -> tuple[int, list[int]]:
    """Elements the batches would pad to, and the first request of each batch."""
    config = ModelConfig(max_batch_size=batch, bucket_window=window)
    batcher = _batcher(_Embedder(), _Answers(), config)
    _queue(batcher, lengths)
    padded, firsts = 0, []
    while batcher.queued:
        jobs = batcher._take(batch)
        padded += len(jobs) * max(job.inputs["ids"].shape[1] for job in jobs)
        firsts.append(int(jobs[0].inputs["ids"][0, 0]))
    return padded, firsts


async def test_a_batch_padded_to_a_long_request_stays_within_the_element_limit() -> None:
    """Every row pads to the longest of its batch: one long request among many short ones
    would otherwise make a batch max_batch_size times its size."""
    model, answers = _Embedder(), _Answers()
    config = ModelConfig(max_batch_size=64, max_batch_delay_ms=20)
    batcher = _batcher(model, answers, config, max_elements=1000)
    _queue(batcher, [600] + [8] * 63)
    batcher.start(on_crash=CRASHES.append)
    await batcher.close()
    assert len(answers.answered) == 64
    assert sum(batch.shape[0] for batch in model.batches) == 64
    assert max(batch.size for batch in model.batches) <= 1000


class _Images:
    """Records every batch it runs: inputs of two padded dimensions (an image, say)."""

    inputs = (TensorSpec("pixels", "FP32", (-1, -1), pad_value=0),)
    outputs = (TensorSpec("embedding", "FP32", (2,)),)

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.batches.append(batch["pixels"])
        return {"embedding": np.zeros((len(batch["pixels"]), 2), np.float32)}


@pytest.mark.parametrize(
    "shapes",
    [
        pytest.param([(1, 500, 1), (1, 1, 500)], id="tall-and-wide"),
        pytest.param([(1, 0, 20_000), (1, 20_000, 0)], id="empty-ones"),
        pytest.param([(1, 30, 10), (1, 10, 30), (1, 20, 20)], id="mixed"),
    ],
)
async def test_a_batch_padded_in_two_dimensions_stays_within_the_element_limit(
    shapes: list[tuple[int, ...]],
) -> None:
    """Padding makes every dimension the batch's largest: a tall image and a wide one, each
    small, would pad together to a square of the largest of both."""
    model, answers = _Images(), _Answers()
    config = ModelConfig(max_batch_size=8, max_batch_delay_ms=20)
    batcher = _batcher(model, answers, config, max_elements=1000)
    for shape in shapes:
        batcher.put(Job(make_ticket(b"{}"), {"pixels": np.ones(shape, np.float32)}, 1, None))
    batcher.start(on_crash=CRASHES.append)
    await batcher.close()
    assert len(answers.answered) == len(shapes)
    assert max(batch.size for batch in model.batches) <= 1000


class _PerToken:
    """Ten times each token id: an output as long as its padded input."""

    inputs = (TensorSpec("ids", "INT64", (-1,), pad_value=0),)
    outputs = (TensorSpec("scores", "FP32", (-1,), follows="ids"),)

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"scores": (batch["ids"] * 10).astype(np.float32)}


@pytest.mark.parametrize("content_type", [JSON, MSGPACK])
async def test_an_output_that_follows_a_padded_input_is_cut_to_each_requests_length(
    content_type: str,
) -> None:
    answers = _Answers()
    batcher = _batcher(_PerToken(), answers, ModelConfig(max_batch_size=8, max_batch_delay_ms=20))
    for request_id, ids in (("short", [1, 2]), ("long", [1, 2, 3, 4, 5, 6])):
        ticket = make_ticket(b"{}", content_type)
        ticket.request_id = request_id
        batcher.put(Job(ticket, {"ids": np.array([ids])}, 1, None))
    batcher.start(on_crash=CRASHES.append)
    await batcher.close()
    results = {
        request_id: decode_response(body, content_type).outputs[0]
        for request_id, body in answers.bodies.items()
    }
    assert results["short"].shape == [1, 2]
    assert to_array(results["short"]).tolist() == [[10, 20]]  # none of the batch's padding
    assert to_array(results["long"]).tolist() == [[10, 20, 30, 40, 50, 60]]


class _Features:
    """Ten features of each token of three: an output as long as its padded input, wider."""

    inputs = (TensorSpec("x", "FP32", (-1, 3), pad_value=0),)
    outputs = (TensorSpec("y", "FP32", (-1, 10), follows="x"),)

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": np.repeat(batch["x"][:, :, :1], 10, axis=2)}


async def test_an_output_is_cut_along_the_lengths_it_follows_alone() -> None:
    answers = _Answers()
    batcher = _batcher(_Features(), answers, ModelConfig(max_batch_size=8, max_batch_delay_ms=20))
    for request_id, tokens in (("short", 2), ("long", 5)):
        ticket = make_ticket(b"{}", MSGPACK)
        ticket.request_id = request_id
        x = np.arange(1, tokens * 3 + 1, dtype=np.float32).reshape(1, tokens, 3)
        batcher.put(Job(ticket, {"x": x}, 1, None))
    batcher.start(on_crash=CRASHES.append)
    await batcher.close()
    results = {
        request_id: to_array(decode_response(body, MSGPACK).outputs[0])
        for request_id, body in answers.bodies.items()
    }
    assert results["short"].shape == (1, 2, 10)  # every feature, none of the padding
    assert results["long"].shape == (1, 5, 10)
    assert results["short"][0, :, 0].tolist() == [1, 4]


def test_a_wider_bucket_window_pads_less_and_a_window_of_one_keeps_arrival_order() -> None:
    lengths = [int(n) for n in np.random.default_rng(0).integers(4, 48, 400)]
    padded = {window: _padded_rows(window, lengths)[0] for window in (1, 4, 16)}
    fifo = sum(max(lengths[i : i + 8]) * len(lengths[i : i + 8]) for i in range(0, 400, 8))
    assert padded[1] == fifo
    assert padded[16] < padded[4] < padded[1]
    assert padded[16] < 1.25 * sum(lengths)
    _, firsts = _padded_rows(1, lengths)
    assert firsts == list(range(1, 401, 8))  # ids are arrival numbers: untouched order


async def test_an_odd_length_request_is_not_starved_by_bucketing() -> None:
    model, answers = _Embedder(), _Answers()
    batcher = _batcher(model, answers)
    lengths = [3] * 5 + [30] + [3] * 200  # one long request amid a stream of short ones
    _queue(batcher, lengths)
    batches = []
    while batcher.queued:
        batches.append(batcher._take(8))
    long_batch = next(
        i for i, jobs in enumerate(batches) if any(job.inputs["ids"].shape[1] == 30 for job in jobs)
    )
    assert long_batch <= 1  # served within a batch of when first come, first served would


class _Timed:
    """A fixed-shape model that doubles its input in `delay` seconds, noting the thread it
    ran on and each batch's rows."""

    inputs = (TensorSpec("x", "FP32", (4,)),)
    outputs = (TensorSpec("y", "FP32", (4,)),)

    def __init__(self) -> None:
        self.delay = 0.0
        self.delays: list[float] = []  # of the next calls, before `delay` again
        self.threads: list[str] = []
        self.batches: list[int] = []

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.threads.append(threading.current_thread().name)
        self.batches.append(len(batch["x"]))
        time.sleep(self.delays.pop(0) if self.delays else self.delay)
        return {"y": batch["x"] * 2}


async def _serve(batcher: Batcher, answers: _Answers, requests: int, rows: int = 1) -> None:
    """One request at a time, each answered before the next: one batch per request."""
    for _ in range(requests):
        expected = len(answers.answered) + 1
        batcher.put(Job(make_ticket(b"{}"), {"x": np.ones((rows, 4), np.float32)}, rows, None))
        async with asyncio.timeout(10):
            while len(answers.answered) < expected:
                await asyncio.sleep(0)


async def test_a_model_proven_fast_runs_inline_until_its_batches_are_slow() -> None:
    model, answers = _Timed(), _Answers()
    # Well above the 5 ms GIL switch interval: a fast call on the thread can wait that long
    # for the GIL while this test's loop spins.
    config = ModelConfig(max_batch_size=8, max_batch_delay_ms=0, inline_below_ms=50)
    batcher = _batcher(model, answers, config)
    batcher.start(on_crash=CRASHES.append)
    main = threading.current_thread().name

    await _serve(batcher, answers, _INLINE_AFTER)  # proving itself, on the thread
    assert model.threads == ["model_0"] * _INLINE_AFTER
    await _serve(batcher, answers, 3)
    assert model.threads[-3:] == [main] * 3
    await _serve(batcher, answers, 2, rows=4)  # bigger than proven: the thread, then inline
    assert model.threads[-2:] == ["model_0", main]

    model.delay = 0.06  # slower than inline_below_ms: back to the thread after two batches
    await _serve(batcher, answers, 3)
    assert model.threads[-3:] == [main, main, "model_0"]
    model.delay = 0.0
    await _serve(batcher, answers, _INLINE_AFTER + 1)  # proven again
    assert model.threads[-1] == main
    model.delay = 0.0  # one slow call alone (the machine, say) changes nothing
    model.delays = [0.06]
    await _serve(batcher, answers, 2)
    assert model.threads[-2:] == [main, main]
    model.delay = 0.25  # far slower: back to the thread at once
    await _serve(batcher, answers, 2)
    assert model.threads[-2:] == [main, "model_0"]
    await batcher.close()
    assert not answers.failed


class _Spinning(_Timed):
    """A model whose call takes `cpu_s` of its own thread's CPU time, noting each call's
    clock time."""

    def __init__(self, cpu_s: float) -> None:
        super().__init__()
        self.cpu_s = cpu_s
        self.clock: list[float] = []

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started, cpu = time.perf_counter(), time.thread_time()
        self.threads.append(threading.current_thread().name)
        while time.thread_time() - cpu < self.cpu_s:
            pass
        self.clock.append(time.perf_counter() - started)
        return {"y": batch["x"] * 2}


@pytest.mark.skipif(
    not Path("/proc/thread-self/schedstat").exists(), reason="needs Linux's scheduler statistics"
)
async def test_a_model_slowed_by_a_busy_machine_stays_inline() -> None:
    """Another process on the model's CPU doubles its calls' clock time: that is the
    machine's doing, not the model's, and the model stays on the loop."""
    model, answers = _Spinning(cpu_s=0.02), _Answers()
    config = ModelConfig(max_batch_size=8, max_batch_delay_ms=0, inline_below_ms=30)
    batcher = _batcher(model, answers, config)
    main = threading.current_thread().name
    batcher.start(on_crash=CRASHES.append)
    # Proven on the thread, now inline; on a busy machine one slow call restarts the proof.
    for _ in range(5):
        await _serve(batcher, answers, _INLINE_AFTER + 1)
        if model.threads[-1] == main:
            break
    assert model.threads[-1] == main
    affinity = os.sched_getaffinity(0)
    cpu = min(affinity)
    os.sched_setaffinity(0, {cpu})
    spin = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nprint(flush=True)\nwhile True: pass"
    busy = await asyncio.create_subprocess_exec(
        sys.executable, "-c", spin, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert busy.stdout is not None
        await busy.stdout.readline()  # spinning on this CPU from now on
        await _serve(batcher, answers, 4)
        await batcher.close()
    finally:
        busy.kill()
        await busy.wait()
        os.sched_setaffinity(0, affinity)
    assert model.threads[-4:] == [main] * 4
    assert min(model.clock[-4:]) > 0.03  # every call on the loop slower than inline_below_ms
    assert not answers.failed


async def test_inline_below_zero_always_uses_the_thread() -> None:
    model, answers = _Timed(), _Answers()
    config = ModelConfig(max_batch_size=8, max_batch_delay_ms=0, inline_below_ms=0)
    batcher = _batcher(model, answers, config)
    batcher.start(on_crash=CRASHES.append)
    await _serve(batcher, answers, _INLINE_AFTER + 4)
    await batcher.close()
    assert set(model.threads) == {"model_0"}


async def test_an_inline_call_over_its_budget_is_a_timeout_and_goes_back_to_the_thread() -> None:
    """The loop cannot cut short a call it runs itself: the call is answered as one on a
    thread would have been at its budget, and the model proves itself again on the thread."""
    model, answers = _Timed(), _Answers()
    config = ModelConfig(max_batch_size=8, max_batch_delay_ms=0, inline_below_ms=50)
    batcher = _batcher(model, answers, config, budget=0.5)
    batcher.start(on_crash=CRASHES.append)
    main = threading.current_thread().name
    await _serve(batcher, answers, _INLINE_AFTER + 1)
    assert model.threads[-1] == main

    model.delay = 0.6  # over the budget, under two: slow, not hung
    batcher.put(Job(make_ticket(b"{}"), {"x": np.ones((1, 4), np.float32)}, 1, None))
    async with asyncio.timeout(10):
        while not answers.failed:
            await asyncio.sleep(0.01)
    assert model.threads[-1] == main
    assert [rejection.code for rejection in answers.failed] == [ErrorCode.TIMEOUT]

    model.delay = 0.0
    await _serve(batcher, answers, 1)
    assert model.threads[-1] == "model_0"
    await batcher.close()


def test_raw_rows_stack_like_arrays() -> None:
    """Requests whose rows stay raw bytes batch exactly as decoded arrays do, mixed or not."""
    spec = TensorSpec("x", "FP32", (2, 3))
    arrays = [
        np.arange(k * 6, (k + rows) * 6, dtype=np.float32).reshape(rows, 2, 3)
        for k, rows in ((0, 1), (1, 2), (3, 1))
    ]
    raw = [memoryview(a.tobytes()) for a in arrays]

    def jobs(parts: list[np.ndarray | memoryview]) -> list[Job]:
        return [
            Job(make_ticket(b"{}"), {"x": part}, a.shape[0], None)
            for part, a in zip(parts, arrays, strict=True)
        ]

    expected = np.concatenate(arrays)
    for parts in (raw, [raw[0], arrays[1], raw[2]], arrays):
        batch = stack(jobs(parts), [spec])["x"]
        np.testing.assert_array_equal(batch, expected)
        assert batch.dtype == np.float32
    assert len(group_by_shape(jobs(raw), [spec])) == 1


class _TwoOutputs:
    inputs = (TensorSpec("x", "FP32", (3,)),)
    outputs = (TensorSpec("y", "FP32", (3,)), TensorSpec("n", "INT64", ()))

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = batch["x"]
        return {"y": x * 2, "n": np.arange(x.shape[0], dtype=np.int64)}


async def test_every_kind_of_response_in_one_batch_is_encoded_as_its_struct_would_be() -> None:
    """msgpack with every output (joined from frames), msgpack with some outputs, and JSON,
    with one and several rows: each body is the encoded InferenceResponse."""
    model, answers = _TwoOutputs(), _Answers()
    config = ModelConfig(max_batch_size=16, max_batch_delay_ms=50)
    batcher = _batcher(model, answers, config)
    kinds = [(MSGPACK, None, 1), (MSGPACK, None, 2), (MSGPACK, ("n",), 1), (JSON, None, 2)] * 2
    jobs = []
    for i, (content_type, wanted, rows) in enumerate(kinds):
        ticket = make_ticket(b"{}", content_type)
        ticket.request_id = f"request-{i}" + "é" * i * 7  # string headers of several sizes
        x = np.full((rows, 3), i, np.float32)
        jobs.append(Job(ticket, {"x": x}, rows, wanted))
    for job in jobs:
        batcher.put(job)
    batcher.start(on_crash=CRASHES.append)
    async with asyncio.timeout(10):
        while len(answers.answered) < len(jobs):
            await asyncio.sleep(0.01)
    await batcher.close()
    assert answers.joined == 4  # msgpack with every output
    assert answers.answered == [job.ticket for job in jobs]  # in order, whatever their kind

    rows = [job.rows for job in jobs]
    outputs = model.run({"x": np.concatenate([job.inputs["x"] for job in jobs])})
    for index, job in enumerate(jobs):
        ticket = job.ticket
        binary = ticket.content_type == MSGPACK
        expected = InferenceResponse(
            model_name="embedder",
            model_version="1",
            id=ticket.request_id,
            outputs=[
                row_tensors(name, outputs[name], rows, binary=binary)[index]
                for name in job.outputs or outputs
            ],
        )
        assert answers.bodies[ticket.request_id] == encode(expected, ticket.content_type)


class _Paced:
    """Takes 20 ms a call, whatever the batch size."""

    inputs = (TensorSpec("x", "FP32", (1,)),)
    outputs = (TensorSpec("y", "FP32", (1,)),)

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(0.02)
        return {"y": batch["x"]}


async def test_the_queue_is_ahead_once_it_holds_that_much_model_time_and_two_batches() -> None:
    answers = _Answers()
    config = ModelConfig(max_batch_size=4, max_batch_delay_ms=0, inline_below_ms=0)
    batcher = _batcher(_Paced(), answers, config)

    def put(count: int) -> None:
        for _ in range(count):
            batcher.put(Job(make_ticket(b"{}"), {"x": np.zeros((1, 1), np.float32)}, 1, None))

    put(100)
    assert batcher.queued_s == 0  # speed unknown yet
    assert not batcher.ahead(0.1, paused=False)
    batcher.start(on_crash=lambda exc: None)
    async with asyncio.timeout(10):
        while len(answers.answered) < 8:  # two calls: a speed of about 4 rows per 20 ms
            await asyncio.sleep(0.001)
    await batcher.close()
    speed = 4 / 0.02
    assert 0.5 * speed < batcher._speed < 1.5 * speed

    batcher = _batcher(_Paced(), _Answers(), config)
    batcher._speed = speed
    put(10)  # 50 ms of model time, past two batches
    assert batcher.queued_s == pytest.approx(0.05)
    assert batcher.ahead(0.05, paused=False)
    assert not batcher.ahead(0.06, paused=False)
    assert batcher.ahead(0.2, paused=True)  # once stopped, until a quarter is left
    assert not batcher.ahead(0.21, paused=True)
    assert not batcher.ahead(0.2, paused=True, resume_s=0.06)  # resumes with more queued
    assert batcher.ahead(0.2, paused=True, resume_s=0.05)
    batcher._take(4)
    batcher._take(4)  # two rows left: short of two batches, whatever their model time
    assert not batcher.ahead(0.001, paused=True)


def test_call_cost_fits_fixed_and_per_element_time() -> None:
    cost = CallCost()
    assert cost.fit() is None
    cost.observe(100, 0.002 + 100 * 1e-5)
    assert cost.fit() is None  # one size says nothing of the slope
    for elements in (10, 1000, 300, 3000):
        cost.observe(elements, 0.002 + elements * 1e-5)
    fixed, per_element = cost.fit()  # type: ignore[misc]
    assert fixed == pytest.approx(0.002)
    assert per_element == pytest.approx(1e-5)
    flat = CallCost()
    for elements in (10, 1000):
        flat.observe(elements, 0.01)
    assert flat.fit() is None  # no cost per element: nothing to weigh padding against


def test_best_run_leaves_far_lengths_behind_and_takes_every_row_that_pads_little() -> None:
    cost = (0.002, 1e-4)  # a call's fixed cost, as much as 20 elements
    # Lengths sorted; the oldest (anchor) is the 10 at index 2.
    lengths = [9, 10, 10, 11, 40, 41]
    assert best_run(lengths, [1] * 6, 2, 8, cost) == (0, 4)
    assert best_run(lengths, [1] * 6, 4, 8, cost) == (4, 6)  # the long ones together
    # At most `limit` rows, counting multi-row jobs as their rows.
    assert best_run([10] * 6, [1, 1, 3, 1, 1, 1], 0, 4, cost) == (0, 2)
    # Equal lengths: the whole run, however cheap a call.
    assert best_run([7] * 5, [1] * 5, 0, 8, (0.0, 1e-4)) == (0, 5)


async def test_a_timed_padded_model_batches_queued_rows_by_length_without_a_backlog() -> None:
    model, answers = _Embedder(), _Answers()
    batcher = _batcher(model, answers)
    for elements in (10, 400, 80, 2000):  # a call costs 0.2 ms plus 10 µs an element
        batcher._cost.observe(elements, 0.0002 + elements * 1e-5)
    _queue(batcher, [12, 60, 11, 58, 12])  # fewer rows than a batch: all would fit
    first = batcher._take(8)
    assert [job.inputs["ids"].shape[1] for job in first] == [12, 11, 12]
    second = batcher._take(8)
    assert [job.inputs["ids"].shape[1] for job in second] == [60, 58]


async def test_a_request_over_a_preferred_size_goes_alone_and_the_loop_lives_on() -> None:
    model, answers = _Embedder(), _Answers()
    config = ModelConfig(max_batch_size=32, max_batch_delay_ms=50, preferred_batch_sizes=[4])
    batcher = _batcher(model, answers, config)
    for elements in (10, 400, 80, 2000):  # timed: batches are chosen by what padding costs
        batcher._cost.observe(elements, 0.0002 + elements * 1e-5)
    big = Job(make_ticket(b"{}"), {"ids": np.full((12, 10), 9)}, 12, None)
    batcher.put(big)
    _queue(batcher, [10, 10, 11])
    crashes: list[BaseException] = []
    batcher.start(on_crash=crashes.append)
    async with asyncio.timeout(10):
        while len(answers.answered) < 4 and not crashes:
            await asyncio.sleep(0.01)
    await batcher.close()
    assert not crashes
    assert model.batches[0].shape[0] == 12  # alone
    assert sum(batch.shape[0] for batch in model.batches) == 15


def _speed(
    lengths: list[int], rows: list[int], run: tuple[int, int], cost: tuple[float, float]
) -> float:
    start, stop = run
    taking = sum(rows[start:stop])
    pairs = zip(lengths[start:stop], rows[start:stop], strict=True)
    useful = sum(length * count for length, count in pairs)
    return useful / (cost[0] + cost[1] * taking * lengths[stop - 1])


def test_best_run_is_within_reach_of_every_run_an_exhaustive_search_finds() -> None:
    rng = np.random.default_rng(1)
    for _ in range(300):
        size = int(rng.integers(1, 40))
        lengths = sorted(int(n) for n in rng.integers(1, 12, size))
        rows = [int(n) for n in rng.integers(1, 4, size)]
        anchor = int(rng.integers(0, size))
        limit = int(rng.integers(max(rows[anchor], 1), 20))
        cost = (float(rng.choice([0.0, 1e-4, 1e-2])), 1e-3)
        start, stop = best_run(lengths, rows, anchor, limit, cost)
        assert start <= anchor < stop
        assert sum(rows[start:stop]) <= limit
        every = [
            (s, t)
            for s in range(anchor + 1)
            for t in range(anchor + 1, size + 1)
            if sum(rows[s:t]) <= limit
        ]
        best = max(_speed(lengths, rows, run, cost) for run in every)
        assert _speed(lengths, rows, (start, stop), cost) >= 0.95 * best * (1 - 1e-9)


class _ObjectOutputs:
    """Returns numpy scalars in an object array: nothing the wire can carry."""

    inputs = (TensorSpec("x", "FP32", (4,)),)
    outputs = (TensorSpec("y", "FP32", (1,)),)

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": np.array([[np.float32(1)]] * batch["x"].shape[0], dtype=object)}


@pytest.mark.parametrize("content_type", [JSON, MSGPACK])
async def test_outputs_that_cannot_be_encoded_answer_every_request_with_an_error(
    content_type: str,
) -> None:
    writes: list[Write] = []
    ledger = Ledger(100, 1 << 20)
    replies = Replies(
        writes.append,
        None,
        ledger,
        dead_letter_topic="dead",
        redis_ttl_s=60,
        redis_prefix="p:",
        on_crash=CRASHES.append,
    )
    batcher = _batcher(_ObjectOutputs(), replies)  # type: ignore[arg-type]
    for i in range(3):
        ticket = make_ticket(b"{}", content_type)
        ticket.request_id = f"r{i}"
        ledger.admit(ticket)
        batcher.put(Job(ticket, {"x": np.ones((1, 4), np.float32)}, 1, None))
    batcher.start(on_crash=CRASHES.append)
    async with asyncio.timeout(10):
        while len(writes) < 3:
            await asyncio.sleep(0.01)
    await batcher.close()
    assert sorted(w.ticket.request_id for w in writes) == ["r0", "r1", "r2"]
    assert {dict(w.headers)[headers.ERROR_CODE] for w in writes} == {b"model_error"}


class _SlowAndCramped:
    """0.2 s a call, and out of memory on more than one row."""

    inputs = (TensorSpec("x", "FP32", (4,)),)
    outputs = (TensorSpec("y", "FP32", (4,)),)

    def __init__(self) -> None:
        self.calls: list[int] = []

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.append(batch["x"].shape[0])
        time.sleep(0.2)
        if batch["x"].shape[0] > 1:
            raise RuntimeError("out of memory")
        return {"y": batch["x"]}


async def test_requests_whose_deadline_passes_while_a_batch_is_split_are_not_run() -> None:
    model, answers = _SlowAndCramped(), _Answers()
    batcher = _batcher(model, answers)
    deadline_ms = int(time.time() * 1000) + 300  # past before the halves reach one row
    for _ in range(4):
        ticket = make_ticket(b"{}")
        ticket.deadline_ms = deadline_ms
        batcher.put(Job(ticket, {"x": np.ones((1, 4), np.float32)}, 1, None))
    batcher.start(on_crash=CRASHES.append)
    async with asyncio.timeout(10):
        while len(answers.answered) + len(answers.failed) < 4:
            await asyncio.sleep(0.01)
    await batcher.close()
    assert not answers.answered
    assert {rejection.code for rejection in answers.failed} == {ErrorCode.EXPIRED}
    assert model.calls == [4, 2]


class _Hangs:
    inputs = (TensorSpec("x", "FP32", (4,)),)
    outputs = (TensorSpec("y", "FP32", (4,)),)

    def __init__(self) -> None:
        self.release = threading.Event()

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.release.wait()
        return {"y": batch["x"]}


async def test_a_call_still_running_a_budget_after_it_timed_out_is_reported_hung() -> None:
    model, answers = _Hangs(), _Answers()
    batcher = Batcher(
        model="hangs",
        version="1",
        runtime=model,  # type: ignore[arg-type]
        config=ModelConfig(max_batch_size=8, max_batch_delay_ms=1),
        executor=ThreadPoolExecutor(1),
        replies=answers,  # type: ignore[arg-type]
        time_budget_s=0.2,
    )
    crashes: list[BaseException] = []
    batcher.put(Job(make_ticket(b"{}"), {"x": np.ones((1, 4), np.float32)}, 1, None))
    batcher.start(on_crash=crashes.append)
    try:
        async with asyncio.timeout(10):
            while not crashes:
                await asyncio.sleep(0.01)
        assert [rejection.code for rejection in answers.failed] == [ErrorCode.TIMEOUT]
        assert isinstance(crashes[0], ModelHung)
    finally:
        model.release.set()
        await batcher.close()


class _LateExecutor(ThreadPoolExecutor):
    """A thread that takes a call and then waits `delay` before running it (held off the
    GIL, say): the call is no longer queued, and not started either."""

    def __init__(self, delay: float) -> None:
        super().__init__(1, thread_name_prefix="model")
        self.delay = delay

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        def late() -> Any:
            time.sleep(self.delay)
            return fn(*args, **kwargs)

        return super().submit(late)


async def test_a_call_taken_by_its_thread_at_the_deadline_is_counted_until_it_returns() -> None:
    """Too late to cancel, it runs: it counts as running (a retired model is not closed under
    it, the exit status knows of it) and is watched for a hang like any call past its budget."""
    answers = _Answers()
    config = ModelConfig(max_batch_size=8, max_batch_delay_ms=1, inline_below_ms=0)
    batcher = _batcher(_Refuses(ValueError), answers, config, budget=0.5)
    batcher._executor = _LateExecutor(delay=0.7)  # past the deadline, not two budgets
    crashes: list[BaseException] = []
    batcher.start(on_crash=crashes.append)
    batcher.put(Job(make_ticket(b"{}"), {"x": np.ones((1, 4), np.float32)}, 1, None))
    async with asyncio.timeout(10):
        while not answers.failed:
            await asyncio.sleep(0.01)
    assert [rejection.code for rejection in answers.failed] == [ErrorCode.TIMEOUT]
    assert batcher.calls_running == 1  # in the model now, or about to be
    async with asyncio.timeout(10):
        while batcher.calls_running:
            await asyncio.sleep(0.01)
    await batcher.close()
    assert crashes == []  # returned within two budgets of its deadline: not hung


class _Refuses:
    """Raises `error` for a batch holding a negative value, after `delay` seconds."""

    inputs = (TensorSpec("x", "FP32", (4,)),)
    outputs = (TensorSpec("y", "FP32", (4,)),)

    def __init__(self, error: type[Exception], delay: float = 0.0) -> None:
        self.error, self.delay, self.calls = error, delay, 0

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        time.sleep(self.delay)
        if (batch["x"] < 0).any():
            raise self.error("refused")
        return {"y": batch["x"]}


def _refusing_batcher(model: _Refuses, answers: _Answers, budget: float) -> Batcher:
    config = ModelConfig(max_batch_size=8, max_batch_delay_ms=50, inline_below_ms=0)
    return _batcher(model, answers, config, budget=budget)


async def _until_outcomes(batcher: Batcher, answers: _Answers, count: int) -> None:
    batcher.start(on_crash=CRASHES.append)
    async with asyncio.timeout(10):
        while len(answers.answered) + len(answers.failed) < count:
            await asyncio.sleep(0.01)
    await batcher.close()


async def _one_batch(batcher: Batcher, answers: _Answers, bad: int, count: int = 8) -> None:
    for i in range(count):
        value = -1.0 if i == bad else 1.0
        batcher.put(Job(make_ticket(b"{}"), {"x": np.full((1, 4), value, np.float32)}, 1, None))
    await _until_outcomes(batcher, answers, count)


@pytest.mark.parametrize("error", [TimeoutError, FutureCancelled, asyncio.CancelledError])
async def test_a_timeout_or_cancellation_a_model_raises_is_isolated_like_any_other_error(
    error: type[Exception],
) -> None:
    """Only the budget running out answers a whole batch `timeout`; a cancellation raised in
    the model's thread is the model's error, not the end of the batch loop."""
    answers = _Answers()
    await _one_batch(_refusing_batcher(_Refuses(error), answers, budget=10), answers, bad=5)
    assert len(answers.answered) == 7
    assert [rejection.code for rejection in answers.failed] == [ErrorCode.MODEL_ERROR]


@pytest.mark.parametrize("inline", [False, True], ids=["in-thread", "inline"])
@pytest.mark.parametrize("error", [StopIteration, SystemExit, asyncio.CancelledError])
async def test_whatever_a_model_raises_is_its_error_on_a_thread_or_inline(
    error: type[BaseException], inline: bool
) -> None:
    """StopIteration (which no future can carry) and exceptions that are not `Exception`s
    are the model's error like any other: they neither stall the batch, end its loop, nor
    end the process."""
    answers = _Answers()
    config = ModelConfig(
        max_batch_size=8, max_batch_delay_ms=1, inline_below_ms=1000 if inline else 0
    )
    model = _Refuses(error)  # type: ignore[arg-type]
    batcher = _batcher(model, answers, config, budget=5)
    batcher.start(on_crash=CRASHES.append)
    try:
        for _ in range(20):  # one batch at a time: fast calls prove it fit to run inline
            batcher.put(Job(make_ticket(b"{}"), {"x": np.ones((1, 4), np.float32)}, 1, None))
            async with asyncio.timeout(5):
                while batcher.calls_running or batcher.queued:
                    await asyncio.sleep(0.005)
        assert (batcher._fast_streak >= 16) == inline
        for i in range(8):
            value = -1.0 if i == 5 else 1.0
            batcher.put(Job(make_ticket(b"{}"), {"x": np.full((1, 4), value, np.float32)}, 1, None))
        async with asyncio.timeout(5):
            while len(answers.answered) + len(answers.failed) < 28:
                await asyncio.sleep(0.01)
    finally:
        await batcher.close()
    assert len(answers.answered) == 20 + 7
    assert [rejection.code for rejection in answers.failed] == [ErrorCode.MODEL_ERROR]
    assert not CRASHES


async def test_the_calls_of_a_batch_split_to_find_a_failure_share_its_one_budget() -> None:
    model, answers = _Refuses(ValueError, delay=0.2), _Answers()
    started = time.monotonic()
    await _one_batch(_refusing_batcher(model, answers, budget=0.5), answers, bad=7)
    # Halving down to the culprit takes 7 calls, 1.4 s: past 0.5 s the rest is `timeout`.
    assert time.monotonic() - started < 1.2
    assert model.calls < 7
    codes = [rejection.code for rejection in answers.failed]
    assert ErrorCode.TIMEOUT in codes
    assert len(answers.answered) + len(codes) == 8


def test_result_headers_kept_for_reuse_stay_bounded_whatever_models_requests_name() -> None:
    replies = Replies(
        lambda write: None,
        None,
        Ledger(100_000, 1 << 30),
        dead_letter_topic="dead",
        redis_ttl_s=60,
        redis_prefix="p:",
        on_crash=CRASHES.append,
    )
    counted = REGISTRY.get_sample_value("surge_errors_total", {"code": "unknown_model"}) or 0
    for i in range(3000):
        ticket = make_ticket(b"{}")
        ticket.model = f"no-such-model-{i}"  # from a request's surge-model header
        replies.error(ticket, Rejection(ErrorCode.UNKNOWN_MODEL, "unknown"))
    assert len(replies._common_headers) <= 1024
    assert REGISTRY.get_sample_value("surge_errors_total", {"code": "unknown_model"}) == (
        counted + 3000
    )


class _BreaksItsDevice:
    """A GPU whose context a batch leaves unusable (a device-side assert, say)."""

    inputs = (TensorSpec("x", "FP32", (4,)),)
    outputs = (TensorSpec("y", "FP32", (4,)),)

    def __init__(self) -> None:
        self.calls = 0

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        raise DeviceFailed("cuda:0: CUDA error: device-side assert triggered")


async def test_a_drain_can_leave_what_will_never_settle() -> None:
    ledger = Ledger(100, 1 << 20)
    tickets = [make_ticket(b"{}") for _ in range(3)]
    for offset, ticket in enumerate(tickets):
        ticket.offset = offset
        ledger.admit(ticket)
    ledger.settle_all([tickets[0]])
    drained = asyncio.ensure_future(ledger.drained(leaving=1))
    await asyncio.sleep(0.01)
    assert not drained.done()
    ledger.settle_all([tickets[1]])
    await asyncio.wait_for(drained, 1)
    assert ledger.offsets.committable() == {tickets[0].tp: 2}  # the third is left unread


def _run_job(values: list[float], name: str = "run") -> Job:
    """A run read together (`Intake.admit_all`): one single-row msgpack request per value."""
    bodies = [np.full(4, value, np.float32).tobytes() for value in values]
    tickets = [make_ticket(body, MSGPACK) for body in bodies]
    for index, ticket in enumerate(tickets):
        ticket.request_id = f"{name}-{index}"
    return Job(tickets[0], {"x": RawRows(bodies, 0, 16)}, len(tickets), None, run=tickets)


async def test_a_run_is_taken_as_far_as_a_batch_has_room_and_each_request_gets_its_rows() -> None:
    model, answers = _Timed(), _Answers()
    batcher = _batcher(model, answers, ModelConfig(max_batch_size=8, max_batch_delay_ms=1))
    alone = Job(make_ticket(b"{}", MSGPACK), {"x": np.full((1, 4), -1, np.float32)}, 1, None)
    alone.ticket.request_id = "alone"
    batcher.put(alone)
    batcher.put_all([_run_job([float(n) for n in range(20)]), _run_job([100.0] * 3, "next")])
    await _until_outcomes(batcher, answers, 24)
    assert model.batches == [8, 8, 8]  # the lone job, then the runs cut to fit
    assert not answers.failed
    assert len(answers.answered) == len({id(ticket) for ticket in answers.answered}) == 24
    expected = {"alone": -2.0, **{f"run-{n}": 2.0 * n for n in range(20)}}
    expected |= {f"next-{n}": 200.0 for n in range(3)}
    for request_id, value in expected.items():
        (output,) = decode_response(answers.bodies[request_id], MSGPACK).outputs
        assert to_array(output).tolist() == [[value] * 4]


async def test_a_failing_request_inside_a_run_is_found_by_halving_the_run() -> None:
    answers = _Answers()
    batcher = _refusing_batcher(_Refuses(ValueError), answers, budget=10)
    batcher.put_all([_run_job([1.0, 1.0, 1.0, 1.0, 1.0, -1.0, 1.0, 1.0])])
    await _until_outcomes(batcher, answers, 8)
    assert len(answers.answered) == 7
    assert "run-5" not in answers.bodies
    assert [rejection.code for rejection in answers.failed] == [ErrorCode.MODEL_ERROR]


async def test_a_run_past_its_deadline_in_the_queue_is_answered_expired_request_by_request() -> (
    None
):
    model, answers = _Timed(), _Answers()
    batcher = _batcher(model, answers)
    run = _run_job([1.0] * 5)
    for ticket in run.tickets:
        ticket.deadline_ms = 1
    batcher.put_all([run])
    await _until_outcomes(batcher, answers, 5)
    assert not model.batches
    assert [rejection.code for rejection in answers.failed] == [ErrorCode.EXPIRED] * 5


def _six_alone() -> list[Job]:
    return [Job(make_ticket(b"{}"), {"x": np.ones((1, 4), np.float32)}, 1, None) for _ in range(6)]


@pytest.mark.parametrize("queued", [_six_alone, lambda: [_run_job([1.0] * 6)]], ids=["jobs", "run"])
async def test_a_failed_device_answers_its_batch_and_leaves_the_queue_to_a_new_process(
    queued: Any,
) -> None:
    model, answers = _BreaksItsDevice(), _Answers()
    batcher = _batcher(model, answers, ModelConfig(max_batch_size=2, max_batch_delay_ms=1))
    batcher.put_all(queued())
    crashes: list[BaseException] = []
    batcher.start(on_crash=crashes.append)
    async with asyncio.timeout(10):
        while not crashes:
            await asyncio.sleep(0.01)
        await batcher.close()
    assert model.calls == 1  # not split in halves: every later call would fail the same way
    assert [type(exc) for exc in crashes] == [DeviceFailed]
    assert [r.code for r in answers.failed] == [ErrorCode.MODEL_ERROR] * 2
    assert "the device failed" in answers.failed[0].message
    assert not answers.answered  # the other four are redelivered to the restarted worker
    assert batcher.abandoned == 4  # requests, not queued jobs: shutdown does not wait for them


async def test_a_run_behind_a_job_over_a_preferred_size_waits_for_the_next_batch() -> None:
    """The first job of a batch goes in whole, even past a preferred size; a run behind it
    then has no room in that batch, and is not cut into requests that overfill it."""
    model, answers = _Timed(), _Answers()
    # A delay no busy machine outlasts before the first batch: that batch is chosen by the
    # preferred size, not by the delay running out with everything queued.
    config = ModelConfig(max_batch_size=64, max_batch_delay_ms=200, preferred_batch_sizes=[8])
    batcher = _batcher(model, answers, config)
    batcher.put(Job(make_ticket(b"{}", MSGPACK), {"x": np.ones((12, 4), np.float32)}, 12, None))
    batcher.put_all([_run_job([1.0] * 30)])
    await _until_outcomes(batcher, answers, 31)
    assert model.batches[0] == 12
    assert max(model.batches) <= 64
    assert sum(model.batches) == 42
