"""Scoring a file: one request per JSON line, one result line per request, in input order.

Each input line is a JSON object of named arrays, e.g. `{"x": [[0.1, 0.2, ...]]}` (rows along
the first axis). A line that is not such an object does not stop the run: its result line
says why, as a result from a worker would. Windows of lines are in flight together, so the
run keeps workers busy while its output stays in input order.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TextIO

import numpy as np

from surge.producers.client import SurgeClient
from surge.producers.requests import Prediction, PredictionError

BAD_LINE = "bad_line"  # the error code of a line that is no request


@dataclass(slots=True)
class ScoreReport:
    lines: int = 0
    ok: int = 0
    errors: int = 0  # results with an error code (bad lines included)
    timed_out: int = 0  # no result within the timeout
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.lines / self.seconds if self.seconds else 0.0


@dataclass(frozen=True, slots=True)
class BadLine:
    """A line that is no request, and why."""

    reason: str


async def score_lines(
    client: SurgeClient,
    model: str,
    lines: Iterable[str],
    out: TextIO,
    *,
    dtype: np.dtype[Any] | str = "float32",
    window: int = 512,
    in_flight: int = 4,
    timeout: float = 60.0,
    version: str | None = None,
    via: Literal["kafka", "redis"] = "kafka",
    topic: str | None = None,
) -> ScoreReport:
    """Send each line as a request and write one JSON result line per input line, in order:
    `{"line": n, "id": ..., "outputs": {...}}`, or `{"line": n, "code": ..., "error": ...}`.
    `window` lines per `predict_many` call, `in_flight` calls at once; each call's requests
    must be answered within `timeout`."""
    report = ScoreReport()
    started = time.perf_counter()
    pending: deque[asyncio.Task[list[dict[str, Any]]]] = deque()
    numbered = 0
    try:
        for chunk in chunks(lines, window):
            parsed = [parse_line(line, dtype) for line in chunk]
            call = _score(client, model, parsed, numbered, timeout, version, via, topic)
            pending.append(asyncio.create_task(call))
            numbered += len(chunk)
            if len(pending) >= in_flight:
                _write(await pending.popleft(), out, report)
        while pending:
            _write(await pending.popleft(), out, report)
    finally:
        for task in pending:
            task.cancel()
    report.seconds = time.perf_counter() - started
    return report


def chunks(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    """The lines `size` at a time (the last chunk takes what is left)."""
    chunk: list[str] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def parse_line(line: str, dtype: np.dtype[Any] | str) -> dict[str, np.ndarray] | BadLine:
    """A line's named arrays, or why it is no request."""
    if not line.strip():
        return BadLine("empty line")
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        return BadLine(f"not JSON: {exc}")
    if not isinstance(value, dict) or not value:
        return BadLine("not a JSON object of named arrays")
    inputs = {}
    for name, data in value.items():
        try:
            array = np.asarray(data, dtype=dtype)
        except (ValueError, TypeError) as exc:
            return BadLine(f"input {name!r} is not an array of {np.dtype(dtype)}: {exc}")
        if array.ndim == 0:
            return BadLine(f"input {name!r} is a scalar, not rows")
        inputs[name] = array
    return inputs


async def _score(
    client: SurgeClient,
    model: str,
    parsed: list[dict[str, np.ndarray] | BadLine],
    first: int,
    timeout: float,
    version: str | None,
    via: Literal["kafka", "redis"],
    topic: str | None,
) -> list[dict[str, Any]]:
    requests = [inputs for inputs in parsed if not isinstance(inputs, BadLine)]
    results = iter(
        await client.predict_many(
            model,
            requests,
            version=version,
            timeout=timeout,
            via=via,
            topic=topic,
            return_exceptions=True,
        )
    )
    lines = []
    for number, inputs in enumerate(parsed, first + 1):
        if isinstance(inputs, BadLine):
            lines.append({"line": number, "code": BAD_LINE, "error": inputs.reason})
        else:
            lines.append({"line": number, **_result(next(results))})
    return lines


def _result(result: Prediction | Exception) -> dict[str, Any]:
    if isinstance(result, Prediction):
        outputs = {name: array.tolist() for name, array in result.outputs.items()}
        return {"id": result.id, "outputs": outputs}
    if isinstance(result, PredictionError):
        return {"id": result.request_id, "code": str(result.code), "error": result.message}
    return {
        "code": "timeout" if isinstance(result, TimeoutError) else "failed",
        "error": str(result),
    }


def _write(lines: list[dict[str, Any]], out: TextIO, report: ScoreReport) -> None:
    for line in lines:
        out.write(json.dumps(line) + "\n")
        report.lines += 1
        if "outputs" in line:
            report.ok += 1
        elif line["code"] == "timeout":
            report.timed_out += 1
        else:
            report.errors += 1
