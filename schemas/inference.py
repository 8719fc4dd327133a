"""Open Inference Protocol (KServe v2) bodies as msgspec Structs.

Payloads built by Triton, KServe or Seldon clients decode unchanged. New fields must get
defaults and existing field types never change: old readers keep working.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from surge.schemas.errors import ErrorCode

MAX_ID_LENGTH = 256
MAX_DIMS = 16

RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH)]
_MAX_ID_BYTES = 4 * MAX_ID_LENGTH  # UTF-8 takes at most 4 bytes a character
Dim = Annotated[int, msgspec.Meta(ge=0)]
Shape = Annotated[list[Dim], msgspec.Meta(max_length=MAX_DIMS)]


class Tensor(msgspec.Struct, omit_defaults=True):
    """One named tensor, as a request input or a response output.

    `data` is a row-major list (flat or nested), or in msgpack raw little-endian bytes,
    which decode to a memoryview over the message: zero-copy into numpy.
    """

    name: str
    shape: Shape
    datatype: str
    data: list[Any] | memoryview
    parameters: dict[str, Any] | None = None


class RequestedOutput(msgspec.Struct, omit_defaults=True):
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A v2 inference request body. `id` falls back to the Kafka key when absent."""

    id: RequestId | None = None
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] | None = None


class InferenceResponse(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A v2 inference response body (`surge-status: ok`)."""

    model_name: str
    model_version: str | None = None
    id: str
    outputs: list[Tensor]
    parameters: dict[str, Any] | None = None


class ErrorResponse(msgspec.Struct, omit_defaults=True):
    """The v2 error body, extended with a stable `code` and the request `id` when known."""

    error: str
    code: ErrorCode
    id: str | None = None


def key_id(key: bytes | None) -> str | None:
    """The id of a request whose body has none: its Kafka key as text, where that could be a
    body's id (UTF-8, 1 to `MAX_ID_LENGTH` characters); None, and the request is named by
    its position (`<topic>-<partition>-<offset>`), where it could not."""
    if not key or len(key) > _MAX_ID_BYTES:
        return None
    try:
        request_id = key.decode()
    except UnicodeDecodeError:
        return None
    return request_id if len(request_id) <= MAX_ID_LENGTH else None
