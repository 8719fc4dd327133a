"""Scoring a file: one request per JSON line, one result line per request, in input order.

Each input line is a JSON object of named arrays, e.g. `{"x": [[0.1, 0.2, ...]]}` (rows along
the first axis). A line that is not such an object, or whose request could not be sent (not
UTF-8, out of range for the dtype, larger than Kafka accepts), does not stop the run: its
result line says why, as a result from a worker would. Windows of lines are in flight
together, so the run keeps workers busy while its output stays in input order.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal, TextIO

import msgspec
import numpy as np
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from surge.producers.client import SurgeClient
from surge.producers.requests import Prediction, PredictionError, request_body, request_headers
from surge.schemas import Tensor, TensorError, datatype_of, to_array

BAD_LINE = "bad_line"  # the error code of a line that is no request
TOO_LARGE = "too_large"  # Kafka refused the request as larger than its topic takes
SEND_FAILED = "failed"  # Kafka refused the request for another reason
NO_RESULT = "timeout"  # no result within the timeout
Line = str | bytes  # bytes are decoded line by line: one that is not UTF-8 is one bad line

_BOM = b"\xef\xbb\xbf"
_SIZING_ID = "0" * 32  # as long as the client's request ids (uuid4 hex)
_SIZING_DEADLINE_MS = 10**13  # more digits than a deadline header has until 2286
_VARINT_MAX = 5  # the body's length prefix, at most


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


@dataclass(frozen=True, slots=True)
class RequestLimit:
    """What a line's request must fit to be sent: the client's encoding, and the largest body
    that stays within the producer's `max_request_size` once key and headers are added."""

    content_type: str
    max_request_size: int
    max_body: int


def request_limit(
    client: SurgeClient,
    model: str,
    versions: Iterable[str | None] = (None,),
    max_request_size: int | None = None,
) -> RequestLimit:
    """The limit of `model`'s requests through `client`, counted as the producer counts a
    record; with several `versions` (a shadow run), the tightest. `max_request_size`: the
    client's producer's own, unless given."""
    max_request_size = max_request_size or client.max_request_size
    overhead = max(
        DefaultRecordBatchBuilder.estimate_size_in_bytes(
            _SIZING_ID.encode(),
            b"",
            request_headers(
                model=model,
                content_type=client.content_type,
                reply_to=client.reply_topic,
                version=version,
                deadline_ms=_SIZING_DEADLINE_MS,
            ),
        )
        for version in versions
    )
    return RequestLimit(
        client.content_type, max_request_size, max_request_size - overhead - _VARINT_MAX
    )


def file_lines(source: BinaryIO) -> Iterator[bytes]:
    """A file's lines, undecoded (`parse_line` decodes each), without a UTF-8 byte-order mark
    at the start."""
    lines = iter(source)
    first = next(lines, None)
    if first is not None:
        yield first.removeprefix(_BOM)
    yield from lines


async def score_lines(
    client: SurgeClient,
    model: str,
    lines: Iterable[Line],
    out: TextIO,
    *,
    dtype: np.dtype[Any] | str = "float32",
    window: int = 512,
    in_flight: int = 4,
    timeout: float = 60.0,
    version: str | None = None,
    via: Literal["kafka", "redis"] = "kafka",
    topic: str | None = None,
    max_request_size: int | None = None,
    report: ScoreReport | None = None,
    first_line: int = 1,
) -> ScoreReport:
    """Send each line as a request and write one JSON result line per input line, in order:
    `{"line": n, "id": ..., "outputs": {...}}`, or `{"line": n, "code": ..., "error": ...}`.
    `window` lines per `predict_many` call, `in_flight` calls at once; each call's requests
    must be answered within `timeout`. A line whose request exceeds `max_request_size` (the
    client producer's, unless given) is a bad line. `report`, if given, is filled in as lines are
    written, so a caller can tell how far an interrupted run got. `first_line` numbers the
    first of `lines` (a run resumed after the lines a run before it wrote)."""
    report = report if report is not None else ScoreReport()
    limit = request_limit(client, model, (version,), max_request_size)
    started = time.perf_counter()
    pending: deque[asyncio.Task[list[dict[str, Any]]]] = deque()
    numbered = first_line - 1
    try:
        for chunk in chunks(lines, window):
            parsed = [parse_line(line, dtype, limit) for line in chunk]
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


def chunks(lines: Iterable[Line], size: int) -> Iterator[list[Line]]:
    """The lines `size` at a time (the last chunk takes what is left)."""
    if size < 1:
        raise ValueError(f"a window of {size} lines: it must be at least 1")
    chunk: list[Line] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def parse_line(
    line: Line, dtype: np.dtype[Any] | str, limit: RequestLimit | None = None
) -> dict[str, np.ndarray] | BadLine:
    """A line's named arrays, or why it is no request; with `limit`, also why its request
    could not be sent."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            return BadLine(f"not UTF-8: {exc}")
    if not line.strip():
        return BadLine("empty line")
    try:
        # As the worker reads JSON: a number past float64 (1e400) is refused, not made ±inf,
        # and NaN and Infinity, which are no JSON, are refused too.
        value = msgspec.json.decode(line)
    except (msgspec.DecodeError, ValueError) as exc:  # ValueError: an int past Python's digits
        return BadLine(f"not JSON: {exc}")
    except RecursionError:
        return BadLine("not JSON: nested too deeply")
    if not isinstance(value, dict) or not value:
        return BadLine("not a JSON object of named arrays")
    try:
        datatype_of(np.dtype(dtype))
    except TensorError as exc:
        return BadLine(f"cannot be encoded as a request: {exc}")
    inputs = {}
    for name, data in value.items():
        array = _array(name, data, dtype)
        if isinstance(array, BadLine):
            return array
        inputs[name] = array
    unsendable = None if limit is None else _unsendable(inputs, limit)
    return unsendable or inputs


def _array(name: str, data: Any, dtype: np.dtype[Any] | str) -> np.ndarray | BadLine:
    try:
        return input_array(name, data, dtype)
    except TensorError as exc:
        return BadLine(f"input {name!r} is not an array of {np.dtype(dtype)}: {_why(name, exc)}")


def input_array(name: str, data: Any, dtype: np.dtype[Any] | str) -> np.ndarray:
    """Nested lists, as JSON reads them, as an array of `dtype`, converted as a worker converts
    a request's list: 1.7 or "12" is no int64 and 0.5 no bool, where numpy would send 1, 12
    and True. Raises TensorError, for a scalar too: a request's inputs are rows."""
    if not isinstance(data, list):
        raise TensorError(f"input {name!r}: a scalar, not rows")
    shape, inner = [], data
    while isinstance(inner, list):  # the first path down; a ragged list fails in to_array
        shape.append(len(inner))
        inner = inner[0] if inner else None
    tensor = Tensor(name=name, shape=shape, datatype=datatype_of(np.dtype(dtype)), data=data)
    return to_array(tensor)


def _why(name: str, exc: TensorError) -> str:
    """A conversion error without the input's name, which the caller's message has."""
    return str(exc).removeprefix(f"input {name!r}: ")


def _unsendable(inputs: Mapping[str, np.ndarray], limit: RequestLimit) -> BadLine | None:
    """Why the producer would refuse this request, found before it goes out with others."""
    try:
        body = request_body(inputs, _SIZING_ID, limit.content_type)
    except (TensorError, msgspec.EncodeError, ValueError, TypeError, OverflowError) as exc:
        return BadLine(f"cannot be encoded as a request: {exc}")
    if len(body) > limit.max_body:
        return BadLine(
            f"the request is {len(body):,} bytes: more than Kafka takes "
            f"(max_request_size {limit.max_request_size:,})"
        )
    return None


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
    # A request Kafka refuses comes back in its place: only its own line says so.
    answers = await client.predict_many(
        model,
        requests,
        version=version,
        timeout=timeout,
        via=via,
        topic=topic,
        return_exceptions=True,
    )
    results = iter(answers)
    lines = []
    for number, inputs in enumerate(parsed, first + 1):
        if isinstance(inputs, BadLine):
            lines.append({"line": number, "code": BAD_LINE, "error": inputs.reason})
        else:
            lines.append({"line": number, **_result(next(results))})
    return lines


def _result(result: Prediction | Exception) -> dict[str, Any]:
    if isinstance(result, Prediction):
        outputs = {name: json_values(array) for name, array in result.outputs.items()}
        return {"id": result.id, "outputs": outputs}
    if isinstance(result, PredictionError):
        return {"id": result.request_id, "code": str(result.code), "error": result.message}
    if isinstance(result, KafkaError):
        return send_failure(result)
    return {
        "code": NO_RESULT if isinstance(result, TimeoutError) else SEND_FAILED,
        "error": str(result),
    }


def send_failure(exc: KafkaError) -> dict[str, str]:
    """The code and message of a request Kafka refused to take."""
    if isinstance(exc, MessageSizeTooLargeError):
        return {
            "code": TOO_LARGE,
            "error": "Kafka refused the request as larger than its topic takes "
            f"(max.message.bytes; it refuses a record batch whole): {exc}",
        }
    return {"code": SEND_FAILED, "error": f"Kafka refused the request: {exc}"}


def json_values(array: np.ndarray) -> Any:
    """An output as JSON values, as the worker writes them in JSON results: NaN and
    ±infinity, which JSON cannot write, become null; bytes become text (invalid UTF-8
    replaced)."""
    values = array.tolist()
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        return _finite_or_null(values)
    if array.dtype.kind in "OS":
        return _text(values)
    return values


def _text(values: Any) -> Any:
    if isinstance(values, list):
        return [_text(value) for value in values]
    return values.decode("utf-8", "replace") if isinstance(values, bytes) else values


def _finite_or_null(values: Any) -> Any:
    if isinstance(values, list):
        return [_finite_or_null(value) for value in values]
    return values if math.isfinite(values) else None


def _write(lines: list[dict[str, Any]], out: TextIO, report: ScoreReport) -> None:
    for line in lines:
        out.write(json.dumps(line, allow_nan=False) + "\n")
        _tally(report, "outputs" in line, line.get("code"), "id" in line)


def _tally(report: ScoreReport, ok: bool, code: str | None, has_id: bool) -> None:
    report.lines += 1
    if ok:
        report.ok += 1
    elif code == NO_RESULT and not has_id:  # the worker's "timeout" result has an id
        report.timed_out += 1
    else:
        report.errors += 1


class _Written(msgspec.Struct):
    """What `tally_written` reads of a result line; the outputs are skipped, not decoded."""

    outputs: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)  # empty: none
    code: str | None = None
    id: str | None = None


def tally_written(results: BinaryIO, report: ScoreReport) -> None:
    """Count result lines written before, by a run that did not finish, into `report`, line
    by line: a resumed run's summary and exit status cover the whole file. A line that is
    no result line counts as an error."""
    decoder = msgspec.json.Decoder(_Written)
    for line in results:
        try:
            written = decoder.decode(line)
        except msgspec.DecodeError:  # ValidationError included
            written = _Written(code="unreadable")
        _tally(report, len(written.outputs) > 0, written.code, written.id is not None)
