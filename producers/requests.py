"""Building request records: body bytes and routing headers, in either encoding."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from surge.schemas import (
    MAX_ID_LENGTH,
    MSGPACK,
    DecodeError,
    ErrorCode,
    InferenceRequest,
    InferenceResponse,
    Status,
    TensorError,
    decode_error,
    decode_response,
    encode,
    from_array,
    headers,
    to_array,
)


@dataclass(frozen=True, slots=True)
class Prediction:
    id: str
    model_name: str
    model_version: str | None
    outputs: dict[str, np.ndarray]


class PredictionError(Exception):
    """A result with `surge-status` error or expired."""

    def __init__(self, code: ErrorCode | str, message: str, request_id: str | None) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


def request_body(inputs: Mapping[str, np.ndarray], request_id: str, content_type: str) -> bytes:
    """The encoded request; raises TensorError for inputs no worker would take, here rather
    than in an error result later."""
    if not 1 <= len(request_id) <= MAX_ID_LENGTH:  # a worker would refuse the whole body
        raise TensorError(f"request ids are 1 to {MAX_ID_LENGTH} characters: {request_id[:40]!r}")
    binary = content_type == MSGPACK
    tensors = []
    for name, value in inputs.items():
        array = np.asarray(value)
        _check_input(name, array, binary)
        tensors.append(from_array(name, array, binary=binary))
    return encode(InferenceRequest(id=request_id, inputs=tensors), content_type)


def _check_input(name: object, array: np.ndarray, binary: bool) -> None:
    if not isinstance(name, str) or not name:
        raise TensorError(f"input names are non-empty strings, not {name!r}")
    if array.ndim == 0:
        raise TensorError(f"input {name!r}: a scalar; inputs are arrays, e.g. [{array.item()!r}]")
    if not binary and array.dtype.kind == "f" and np.isinf(array).any():
        # JSON has no infinity: it would go out as null, which a worker reads as NaN.
        raise TensorError(f"input {name!r} holds ±Inf, which JSON cannot carry: send msgpack")
    if array.dtype.kind not in "OS":  # objects, or numpy's fixed-size bytes
        return
    for value in array.ravel().tolist():
        if isinstance(value, str):
            continue
        if not isinstance(value, bytes):
            raise TensorError(
                f"input {name!r}: an array of objects holds strings or bytes, not "
                f"{type(value).__name__} (give numbers a numeric dtype)"
            )
        if not binary:
            try:
                value.decode()
            except UnicodeDecodeError:
                raise TensorError(
                    f"input {name!r}: bytes that are not UTF-8 need msgpack; JSON carries text"
                ) from None


def request_headers(
    *,
    model: str,
    content_type: str,
    reply_to: str | None,
    version: str | None = None,
    deadline_ms: int | None = None,
) -> list[tuple[str, bytes]]:
    fields = [(headers.MODEL, model), (headers.CONTENT_TYPE, content_type)]
    if reply_to:
        fields.append((headers.REPLY_TO, reply_to))
    if version is not None:
        fields.append((headers.VERSION, str(version)))
    if deadline_ms is not None:
        fields.append((headers.DEADLINE_MS, str(deadline_ms)))
    return [(name, value.encode()) for name, value in fields]


def read_result(body: bytes, content_type: str, status: str) -> Prediction | PredictionError:
    """Turn a result body (and its `surge-status`) into a Prediction or a PredictionError."""
    if status == Status.OK:
        return _prediction(decode_response(body, content_type))
    error = decode_error(body, content_type)
    return PredictionError(error.code, error.error, error.id)


def read_redis_result(body: bytes, content_type: str) -> Prediction | PredictionError:
    """Redis values carry no headers: an error body is told apart by its `code` field. A body
    that is neither raises why it is no result (the likelier of the two readings)."""
    try:
        return _prediction(decode_response(body, content_type))
    except Exception as not_a_result:
        try:
            error = decode_error(body, content_type)
        except DecodeError:
            raise not_a_result from None
        return PredictionError(error.code, error.error, error.id)


def _prediction(response: InferenceResponse) -> Prediction:
    return Prediction(
        id=response.id,
        model_name=response.model_name,
        model_version=response.model_version,
        outputs={t.name: to_array(t) for t in response.outputs},
    )
