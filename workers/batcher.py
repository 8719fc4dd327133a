"""Dynamic batching for one served model version.

A batch closes when it reaches max_batch_size rows, when a preferred size is ready, or when
its oldest request has waited max_batch_delay. The model runs in an executor so the event
loop keeps consuming, decoding and publishing while a batch computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import CancelledError as FutureCancelled
from concurrent.futures import Executor
from typing import Any

import numpy as np
import structlog

from surge.config import ModelConfig
from surge.schemas import (
    MSGPACK,
    ErrorCode,
    InferenceResponse,
    ResponseFrames,
    Tensor,
    datatype_of,
    from_array,
    raw_rows,
    row_tensors,
)
from surge.workers import cpu_wait, metrics
from surge.workers.batching import CallCost, best_run, check_rows, group_by_shape, stack
from surge.workers.inline import WATCH
from surge.workers.intake import Job
from surge.workers.replies import Replies
from surge.workers.runtimes import DeviceFailed, Runtime
from surge.workers.tasks import supervised
from surge.workers.tickets import Rejection

log = structlog.get_logger("surge.batcher")

_INLINE_AFTER = 16  # consecutive fast batches on a thread before a model may run inline
_SLOW_CALLS = 2  # slow calls in a row that send a proven model back to the thread...
_FAR_SLOWER = 4  # ... or one call this many times inline_below_ms
_SPEED_WEIGHT = 0.2  # of the latest batch in the rows/s estimate (an exponential average)
# Response frames kept: for this many output shapes, this many row counts each.
_FRAME_SIGNATURES = 16
_FRAMES_PER_SIGNATURE = 256
# Above this many output bytes per response, copying them costs far more than encoding the
# rest: frames would save nothing worth cutting them for.
_FRAMES_UP_TO = 64 * 1024

# Each output's name, datatype and shape past the batch dimension.
_Signature = tuple[tuple[str, str, tuple[int, ...]], ...]
_Raw = list[tuple[memoryview, int]]  # each output's raw bytes, and its bytes per row


class _OverBudget(Exception):
    """A batch's time budget ran out (not a TimeoutError a model raises itself)."""


class ModelHung(RuntimeError):
    """A model call still running long past its time budget: its thread is lost."""

    def __init__(self, model: str, seconds: float) -> None:
        super().__init__(f"model {model}: a call still running after {seconds:g}s")


class Batcher:
    def __init__(
        self,
        *,
        model: str,
        version: str,
        runtime: Runtime,
        config: ModelConfig,
        executor: Executor,
        replies: Replies,
        time_budget_s: float,
        max_elements: int = 1 << 22,
    ) -> None:
        self.model = model
        self.version = version
        self._label = f"{model}:{version}"
        self._runtime = runtime
        self._executor = executor
        self._replies = replies
        self._budget = time_budget_s
        self._max_rows = config.max_batch_size
        self._delay = config.max_batch_delay_ms / 1000
        self._preferred = sorted(config.preferred_batch_sizes, reverse=True)
        # Rows at which a waiting loop should look again: the smallest size it would take.
        self._wake_rows = min(config.preferred_batch_sizes, default=config.max_batch_size)
        self._instances = config.instances
        self._bucket_window = config.bucket_window
        self._inline_below = config.inline_below_ms / 1000
        self._speed = 0.0  # rows/s of recent model calls, every instance together; 0: none yet
        self._fast_streak = 0  # consecutive batches that ran faster than inline_below_ms
        self._slow_calls = 0  # consecutive batches that did not
        self._proven_elements = 0  # the largest batch (input elements) of the streak
        self._padded = [spec.name for spec in runtime.inputs if spec.pad_value is not None]
        # Padded, a batch holds rows × each dimension's largest size: one long request could
        # make a batch of max_batch_size rows its length, far past what any request may hold.
        self._max_padded = max_elements
        # Outputs cut back per request to the length of the padded input they follow: output
        # name -> (that input, which of its row dimensions vary; the others are no padding).
        shapes = {spec.name: spec.shape for spec in runtime.inputs}
        self._follows = {
            spec.name: (spec.follows, [size == -1 for size in shapes[spec.follows]])
            for spec in runtime.outputs
            if spec.follows
        }
        self._cost = CallCost()  # of padded models' calls, for choosing what to batch
        self._queue: deque[Job] = deque()
        self._rows = 0
        self._wake = asyncio.Event()
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._on_crash: Callable[[BaseException], None] = lambda exc: None  # until started
        self._device_failed = False
        self.calls_running = 0  # on an executor thread, not returned yet
        self._not_run = 0  # jobs taken for a batch after the device failed
        self._batch_ids = itertools.count(1)
        self._batch_rows = metrics.BATCH_ROWS.labels(model)
        self._batch_seconds = metrics.BATCH_SECONDS.labels(model)
        self._queue_seconds = metrics.QUEUE_SECONDS.labels(model)
        self._ok = metrics.RESULTS.labels(model, "ok")
        self._frame_cache: dict[_Signature, dict[int, ResponseFrames | None]] = {}

    @property
    def queued(self) -> int:
        """Jobs queued (a run read together is one)."""
        return len(self._queue)

    @property
    def queued_s(self) -> float:
        """Model time to run what is queued, at the speed of recent calls (0 before any)."""
        return self._rows / self._speed if self._speed else 0.0

    def ahead(self, limit_s: float, *, paused: bool, resume_s: float | None = None) -> bool:
        """Whether this much is queued that fetching for this model may stop: `limit_s` of
        model time (once stopped, down to `resume_s`, a quarter of it unless given), and never
        less than two full batches per instance, so that batches stay full while fetching
        starts again."""
        if self._rows < 2 * self._max_rows * self._instances:
            return False
        if not paused:
            return self.queued_s >= limit_s
        return self.queued_s >= (limit_s / 4 if resume_s is None else resume_s)

    def start(self, on_crash: Callable[[BaseException], None]) -> None:
        """Start the batch loops; a loop that dies (a bug), or a model call that hangs,
        calls `on_crash`."""
        self._on_crash = on_crash
        self._tasks = [
            supervised(self._loop(), f"batcher-{self.model}-{self.version}-{i}", on_crash)
            for i in range(self._instances)
        ]

    def put(self, job: Job) -> None:
        self.put_all((job,))

    def put_all(self, jobs: Sequence[Job]) -> None:
        """Queue jobs, in order."""
        if self._padded:
            for job in jobs:
                job.length = self._length(job)
        was_empty = not self._queue
        self._queue.extend(jobs)
        self._rows += sum(job.rows for job in jobs)
        if jobs and (was_empty or self._rows >= self._wake_rows):
            self._wake.set()

    async def close(self) -> None:
        """Run what is queued at once, then stop."""
        self._closing = True
        self._wake.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)  # crashes are supervised

    async def _loop(self) -> None:
        while not self._device_failed:
            jobs = await self._next_batch()
            if jobs is None:
                return
            try:
                await self._execute(jobs)
            except Exception as exc:  # a bug here must not strand the batch or kill the loop
                log.exception("batch_failed", model=self.model, version=self.version)
                self._error(jobs, Rejection(ErrorCode.INTERNAL, repr(exc)))
            await asyncio.sleep(0)  # an inline batch awaited nothing: let the others move

    async def _next_batch(self) -> list[Job] | None:
        while True:
            timeout = None
            if self._queue:
                waited = time.monotonic() - self._queue[0].ticket.received
                limit = self._ready_rows(waited)
                if limit:
                    return self._take(limit)
                timeout = self._delay - waited
            elif self._closing:
                return None
            self._wake.clear()
            # asyncio.timeout, not wait_for: no task per wait (once or twice per batch)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    def _ready_rows(self, waited: float) -> int:
        """How many rows to take now, or 0 to keep waiting."""
        if self._rows >= self._max_rows:
            return self._max_rows
        if self._closing or waited >= self._delay:
            return self._rows
        for size in self._preferred:
            if self._rows >= size:
                return size
        return 0

    def _take(self, limit: int) -> list[Job]:
        padded = bool(self._padded)
        if padded and len(self._queue) > 1 and self._bucket_window > 1:
            limit = self._bucket(limit)
        jobs: list[Job] = []
        rows = 0
        dims: dict[str, tuple[int, ...]] = {}  # each padded input's largest size, by dimension
        now_ms = int(time.time() * 1000)
        queue = self._queue
        while queue:
            if padded:
                # What padding will allocate: every dimension as large as the batch's largest.
                grown = _grown(dims, queue[0], self._padded)
                if jobs and (rows + queue[0].rows) * _row_elements(grown) > self._max_padded:
                    break  # the rest waits for the next batch
                dims = grown
            job = queue.popleft()
            if rows + job.rows > limit:
                # A run goes in as far as it fits, one request at least; another job waits
                # for the next batch, unless this one is empty.
                fits = max(limit - rows, 0) // job.each if len(job.run) > 1 else 0
                if fits == 0 and jobs:
                    queue.appendleft(job)
                    break
                if len(job.run) > 1:
                    job, rest = job.split(max(fits, 1))
                    queue.appendleft(rest)
            self._rows -= job.rows
            deadline_ms = job.ticket.deadline_ms  # `Ticket.expired`, inline: a run shares it
            if deadline_ms is not None and now_ms >= deadline_ms:
                self._error([job], Rejection(ErrorCode.EXPIRED, "deadline passed in queue"))
                continue
            jobs.append(job)
            rows += job.rows
        return jobs

    def _bucket(self, limit: int) -> int:
        """Bring a batch of padded inputs that pads little to the front of the queue, and
        return its rows. It holds the oldest job, and others from the first `bucket_window`
        batches' worth of the queue; the jobs left behind keep their arrival order, so a job
        is overtaken only by later ones that batch better with the oldest.

        Once calls of a few sizes have timed the model (`CallCost`), the batch is the run of
        jobs sorted by length that gets the most real elements per second of model time
        (`best_run`): a job far longer or shorter than the oldest waits for a batch of its
        own length rather than make every row of this one pad to it or with it. Before that,
        and under a backlog only, the batch is the oldest and the jobs closest to its length."""
        cost = self._cost.fit()
        if cost is None and self._rows <= limit:
            return limit  # everything fits, and nothing says what padding costs
        queue = self._queue
        if queue[0].rows >= limit:  # over a preferred size alone: a batch of its own
            return queue[0].rows
        window = [queue.popleft() for _ in range(min(len(queue), self._bucket_window * limit))]
        oldest = window[0]
        if cost is not None:
            ranked = sorted(window, key=lambda job: job.length)  # stable: oldest first of ties
            anchor = next(i for i, job in enumerate(ranked) if job is oldest)
            lengths, rows = [job.length for job in ranked], [job.rows for job in ranked]
            start, stop = best_run(lengths, rows, anchor, limit, cost)
            chosen = {id(job) for job in ranked[start:stop]}
        else:
            # At most `limit` jobs fit: the closest that many, without sorting the window.
            target, taken = oldest.length, oldest.rows
            chosen = {id(oldest)}
            for job in heapq.nsmallest(limit, window[1:], key=lambda job: abs(job.length - target)):
                if taken + job.rows <= limit:
                    chosen.add(id(job))
                    taken += job.rows
        batch = [job for job in window if id(job) in chosen]
        rest = [job for job in window if id(job) not in chosen]
        queue.extendleft(reversed(batch + rest))
        return sum(job.rows for job in batch)

    def _length(self, job: Job) -> int:
        return sum(job.inputs[name].size // job.rows for name in self._padded)

    async def _call(self, jobs: list[Job], deadline: float) -> tuple[dict[str, np.ndarray], float]:
        """Stack and run, by the batch's `deadline` (event-loop time): inline once the model
        has proved fast at this size, else in the executor."""
        # Stacked here: the executor thread should hold the GIL as little as possible, or the
        # event loop waits for it (up to the 5 ms switch interval) at every hand-over.
        batch = stack(jobs, self._runtime.inputs)
        elements = sum(array.size for array in batch.values())
        proven = self._fast_streak >= _INLINE_AFTER
        if proven and elements <= self._proven_elements:
            # A call this short costs less than the thread hand-off and the GIL convoy that
            # follows it. Only sizes the streak has covered run here: a bigger batch proves
            # itself on the thread first.
            waited = cpu_wait.waited_s()
            started = time.perf_counter()
            WATCH.call = (self._label, started, self._budget)  # a hang ends the process
            try:
                outputs = self._model(batch)
            finally:
                WATCH.call = None
            seconds = time.perf_counter() - started
            own = seconds - (cpu_wait.waited_s() - waited)
        else:
            outputs, seconds, own = await self._in_thread(batch, _requests(jobs), deadline)
        # Judged by its own time: what the machine gave its CPU to others is not the model's.
        if own < self._inline_below:
            self._fast_streak += 1
            self._slow_calls = 0
            self._proven_elements = max(self._proven_elements, elements)
        else:
            self._slow_calls += 1
            # One slow call of a proven model is more often the machine's doing (a pause, a
            # busy neighbour) than the model's: it leaves the loop at the second in a row, or
            # at once when far slower. Proving it again would take _INLINE_AFTER thread calls.
            if (
                not proven
                or self._slow_calls >= _SLOW_CALLS
                or own >= _FAR_SLOWER * self._inline_below
            ):
                self._fast_streak = self._proven_elements = self._slow_calls = 0
        if proven != (self._fast_streak >= _INLINE_AFTER):
            if not proven:
                WATCH.start()
            log.info(
                "model_in_thread" if proven else "model_inline",
                model=self.model,
                version=self.version,
                batch_ms=round(seconds * 1000, 3),
            )
        if time.monotonic() > deadline:  # on the loop, which could not cut it short
            raise _OverBudget(
                f"batch of {_requests(jobs)} requests outlived its {self._budget:g}s budget"
            )
        return outputs, seconds

    def _model(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The runtime's call, whatever it raises an `Exception` the batch's requests can be
        answered with (split to find the culprit, then `model_error`)."""
        try:
            return self._runtime.run(batch)
        except (StopIteration, FutureCancelled, asyncio.CancelledError) as exc:
            # A future cannot carry StopIteration (asyncio would leave the batch waiting out
            # its budget), and a cancellation would read as the batch's own and end the loop
            # with the batch unanswered.
            raise RuntimeError(f"the model raised {exc!r}") from exc
        except Exception:
            raise
        except BaseException as exc:  # SystemExit from a model: not the process's to end
            raise RuntimeError(f"the model raised {exc!r}") from exc

    async def _in_thread(
        self, batch: dict[str, np.ndarray], requests: int, deadline: float
    ) -> tuple[dict[str, np.ndarray], float, float]:
        """Run in the executor by the batch's deadline, which waiting for a thread still held
        by a call that blew its budget counts against too. The outputs, the call's time, and
        that time less its thread's waits for a CPU."""
        loop = asyncio.get_running_loop()
        started = asyncio.Event()
        clock: list[float] = []

        def call() -> dict[str, np.ndarray]:
            clock.append(time.perf_counter())
            waited = cpu_wait.waited_s()
            loop.call_soon_threadsafe(started.set)
            outputs = self._model(batch)
            clock.append(time.perf_counter())  # the call's own time, not the loop's delay
            clock.append(cpu_wait.waited_s() - waited)
            return outputs

        queued = self._executor.submit(call)
        future = asyncio.wrap_future(queued)
        self.calls_running += 1
        future.add_done_callback(self._call_ended)
        try:
            async with asyncio.timeout_at(deadline):
                await started.wait()
        except TimeoutError:
            if queued.cancel():  # still queued: it never runs
                raise _OverBudget(
                    f"model busy for over {self._budget:g}s with an earlier batch"
                ) from None
            # Taken by a thread at the last moment (perhaps not in the model yet): over budget
            # like any call running at the deadline, and watched for a hang like one.
        budget = asyncio.timeout_at(deadline)
        try:
            async with budget:
                outputs = await asyncio.shield(future)
        except TimeoutError:
            if not budget.expired():
                raise  # the model's own, an error like any other
            # A thread cannot be interrupted. A call still running another budget from now
            # is hung: its thread is lost to every later batch (and would keep the process
            # from exiting), so the worker restarts, with a runtime of its own.
            loop.call_later(self._budget, self._hung, future)
            raise _OverBudget(
                f"batch of {requests} requests outlived its {self._budget:g}s budget"
            ) from None
        seconds = clock[1] - clock[0]
        return outputs, seconds, seconds - clock[2]

    def _call_ended(self, _: asyncio.Future[Any]) -> None:
        self.calls_running -= 1

    def _hung(self, call: asyncio.Future[Any]) -> None:
        if not call.done():
            self._on_crash(ModelHung(f"{self.model}:{self.version}", 2 * self._budget))

    async def _execute(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        self._queue_seconds.observe(time.monotonic() - jobs[0].ticket.received)
        batch_id = f"{self.model}:{self.version}:{next(self._batch_ids)}"
        with structlog.contextvars.bound_contextvars(batch_id=batch_id):
            for index, group in enumerate(group_by_shape(jobs, self._runtime.inputs)):
                # Taken moments ago, the first group is in time; the calls before a later one
                # took time. Each is a batch of its own, with its own budget, however often
                # a failure splits it.
                deadline = time.monotonic() + self._budget
                await self._run(group if index == 0 else self._unexpired(group), deadline)
            log.debug("batch_done", requests=_requests(jobs))

    @property
    def abandoned(self) -> int:
        """Requests this batcher will never answer: its device failed before they ran."""
        return self._not_run + _requests(self._queue) if self._device_failed else 0

    async def _run(self, jobs: list[Job], deadline: float) -> None:
        """Run one model call by the batch's deadline; on failure split the batch in halves
        to isolate the culprit."""
        if self._device_failed:
            self._not_run += _requests(jobs)
            return
        if not jobs:
            return
        total = sum(job.rows for job in jobs)
        try:
            if time.monotonic() >= deadline:  # spent by the calls of a batch split before
                raise _OverBudget(f"batch outlived its {self._budget:g}s budget")
            outputs, seconds = await self._call(jobs, deadline)
            check_rows(outputs, total)
        except _OverBudget as exc:
            log.error(
                "batch_timeout", model=self.model, version=self.version, requests=_requests(jobs)
            )
            self._error(jobs, Rejection(ErrorCode.TIMEOUT, str(exc)))
            return
        except DeviceFailed as exc:
            # Every later call fails too, and which request broke the device cannot be told
            # now: answer the batch, and stop the worker for a new process and context.
            log.error("device_failed", model=self.model, version=self.version, error=str(exc))
            self._error(jobs, Rejection(ErrorCode.MODEL_ERROR, f"the device failed: {exc}"))
            # What is still queued stays unanswered, uncommitted: the next owner serves it.
            self._device_failed = True
            self._on_crash(exc)
            return
        except Exception as exc:
            if len(jobs) > 1 or len(jobs[0].run) > 1:
                first, second = _halves(jobs)  # the failed call took time: deadlines anew
                await self._run(self._unexpired(first), deadline)
                await self._run(self._unexpired(second), deadline)
                return
            ticket = jobs[0].ticket
            log.warning(
                "model_error", model=self.model, request_id=ticket.request_id, error=repr(exc)
            )
            self._replies.error(ticket, Rejection(ErrorCode.MODEL_ERROR, f"model raised {exc!r}"))
            return
        self._batch_seconds.observe(seconds)
        self._batch_rows.observe(total)
        if self._padded:
            self._cost.observe(total * max(job.length for job in jobs), seconds)
        if seconds > 0:
            speed = total / seconds * self._instances
            weight = _SPEED_WEIGHT if self._speed else 1.0
            self._speed += weight * (speed - self._speed)
        try:
            self._answer(jobs, outputs)
            answered = _requests(jobs)
        except Exception as exc:  # outputs the wire cannot carry (an object array, say)
            log.warning("outputs_unencodable", model=self.model, error=repr(exc))
            tickets = [ticket for job in jobs for ticket in job.tickets]
            answered = sum(ticket.answered for ticket in tickets)
            rejection = Rejection(ErrorCode.MODEL_ERROR, f"outputs could not be encoded: {exc!r}")
            for ticket in tickets:
                if not ticket.answered:
                    self._replies.error(ticket, rejection)
        self._ok.inc(answered)

    def _error(self, jobs: Sequence[Job], rejection: Rejection) -> None:
        """The same error result for every request of these jobs."""
        for job in jobs:
            for ticket in job.tickets:
                self._replies.error(ticket, rejection)

    def _unexpired(self, jobs: list[Job]) -> list[Job]:
        """The jobs still within their deadlines; the others are answered `expired`."""
        now_ms = int(time.time() * 1000)
        if not any(job.ticket.expired(now_ms) for job in jobs):
            return jobs
        live = []
        for job in jobs:
            if job.ticket.expired(now_ms):  # a run's requests share their deadline
                self._error(
                    [job], Rejection(ErrorCode.EXPIRED, "deadline passed before the model ran")
                )
            else:
                live.append(job)
        return live

    def _answer(self, jobs: list[Job], outputs: dict[str, np.ndarray]) -> None:
        """One response per request. Each output is converted once for the whole batch; msgpack
        responses with every output are joined from frames (`ResponseFrames`), the others
        encoded from Structs (raw bytes for msgpack, lists for JSON)."""
        if self._follows:
            self._answer_cut(jobs, outputs)
            return
        if self._answer_alike(jobs, outputs):
            return
        names = list(outputs)
        requests = [(ticket, job.each, job.outputs) for job in jobs for ticket in job.tickets]
        rows = [count for _, count, _ in requests]
        framed: tuple[_Signature, _Raw, dict[int, ResponseFrames | None]] | None = None
        converted: dict[bool, dict[str, list[Tensor]]] = {}
        ok, ok_body = self._replies.ok, self._replies.ok_body
        model, version = self.model, self.version
        start = 0
        for index, (ticket, count, wanted) in enumerate(requests):
            start += count
            binary = ticket.content_type == MSGPACK
            if binary and wanted is None:
                if framed is None:  # for the first job that can use it
                    framed = self._framed(outputs)
                frames = self._frames(framed, count)
                if frames is not None:
                    begin = start - count
                    data = [view[begin * size : start * size] for view, size in framed[1]]
                    ok_body(ticket, frames.body(ticket.request_id, data))
                    continue
            tensors = converted.get(binary)
            if tensors is None:
                tensors = converted[binary] = {
                    name: row_tensors(name, outputs[name], rows, binary=binary) for name in names
                }
            response = InferenceResponse(
                model_name=model,
                model_version=version,
                id=ticket.request_id,
                outputs=[tensors[name][index] for name in wanted or names],
            )
            ok(ticket, response)

    def _answer_alike(self, jobs: list[Job], outputs: dict[str, np.ndarray]) -> bool:
        """Answer a batch of requests alike (msgpack, every output, as many rows each) with
        bodies built together (`ResponseFrames.bodies`); False if they are not alike."""
        count = jobs[0].each
        for job in jobs:  # a run's requests are alike
            if job.each != count or job.outputs is not None or job.ticket.content_type != MSGPACK:
                return False
        framed = self._framed(outputs)
        frames = self._frames(framed, count)
        if frames is None:
            return False
        tickets = [ticket for job in jobs for ticket in job.tickets]
        bodies = frames.bodies([t.request_id for t in tickets], [view for view, _ in framed[1]])
        self._replies.ok_bodies(tickets, bodies)
        return True

    def _answer_cut(self, jobs: list[Job], outputs: dict[str, np.ndarray]) -> None:
        """One response per job, its outputs that follow a padded input cut back to that
        input's own length: the batch's padding is no part of any request's result."""
        start = 0
        for job in jobs:
            end = start + job.rows
            binary = job.ticket.content_type == MSGPACK
            tensors = []
            for name in job.outputs or list(outputs):
                rows = outputs[name][start:end]
                if (follows := self._follows.get(name)) is not None:
                    source, varies = follows
                    own = job.inputs[source].shape[1:]
                    cut = (
                        slice(0, n) if v else slice(None) for n, v in zip(own, varies, strict=True)
                    )
                    rows = rows[(slice(None), *cut)]
                tensors.append(from_array(name, rows, binary=binary))
            response = InferenceResponse(
                model_name=self.model,
                model_version=self.version,
                id=job.ticket.request_id,
                outputs=tensors,
            )
            self._replies.ok(job.ticket, response)
            start = end

    def _framed(
        self, outputs: dict[str, np.ndarray]
    ) -> tuple[_Signature, _Raw, dict[int, ResponseFrames | None]]:
        """The batch's output shapes, each output's raw bytes and bytes per row, and the
        frames cut so far for those shapes, by rows (kept across batches)."""
        signature = tuple(
            (name, datatype_of(array.dtype), array.shape[1:]) for name, array in outputs.items()
        )
        if any(datatype == "BYTES" for _, datatype, _ in signature):
            return signature, [], {}  # no raw bytes: nothing can be cut
        raw = [
            raw_rows(array, datatype)
            for (_, datatype, _), array in zip(signature, outputs.values(), strict=True)
        ]
        by_rows = self._frame_cache.get(signature)
        if by_rows is None:
            if len(self._frame_cache) >= _FRAME_SIGNATURES:
                self._frame_cache.clear()
            by_rows = self._frame_cache[signature] = {}
        elif len(by_rows) >= _FRAMES_PER_SIGNATURE:
            by_rows.clear()
        return signature, raw, by_rows

    def _frames(
        self, framed: tuple[_Signature, _Raw, dict[int, ResponseFrames | None]], rows: int
    ) -> ResponseFrames | None:
        """The frames for responses of `rows` rows to these outputs, cut once and kept."""
        signature, raw, by_rows = framed
        frames = by_rows.get(rows, False)
        if frames is False:
            frames = by_rows[rows] = self._cut(signature, raw, rows)
        return frames

    def _cut(self, signature: _Signature, raw: _Raw, rows: int) -> ResponseFrames | None:
        """Frames for responses of `rows` rows to outputs of this signature."""
        if not raw:
            return None
        outputs = [
            (name, datatype, [rows, *tail], rows * size)
            for (name, datatype, tail), (_, size) in zip(signature, raw, strict=True)
        ]
        if sum(size for *_, size in outputs) > _FRAMES_UP_TO:
            return None
        return ResponseFrames.cut(self.model, self.version, outputs)


def _grown(
    dims: dict[str, tuple[int, ...]], job: Job, names: list[str]
) -> dict[str, tuple[int, ...]]:
    """Each padded input's largest size by dimension (past the rows), with `job` in too."""
    grown = {}
    for name in names:
        shape = job.inputs[name].shape[1:]
        seen = dims.get(name)
        grown[name] = shape if seen is None else tuple(map(max, seen, shape))
    return grown


def _row_elements(dims: dict[str, tuple[int, ...]]) -> int:
    """Elements of one padded row: of every padded input together."""
    return sum(math.prod(shape) for shape in dims.values())


def _requests(jobs: Iterable[Job]) -> int:
    return sum(len(job.run) or 1 for job in jobs)


def _halves(jobs: list[Job]) -> tuple[list[Job], list[Job]]:
    """A batch cut in two, by jobs, or a run of one job by its requests."""
    if len(jobs) > 1:
        middle = len(jobs) // 2
        return jobs[:middle], jobs[middle:]
    first, second = jobs[0].split(len(jobs[0].run) // 2)
    return [first], [second]
