"""Encoders and decoders for both wire encodings, built once at import."""

from __future__ import annotations

from typing import Any

import msgspec

from surge.schemas.headers import JSON, MSGPACK
from surge.schemas.inference import ErrorResponse, InferenceRequest, InferenceResponse, Tensor

_request_decoders = {
    JSON: msgspec.json.Decoder(InferenceRequest),
    MSGPACK: msgspec.msgpack.Decoder(InferenceRequest),
}
_response_decoders = {
    JSON: msgspec.json.Decoder(InferenceResponse),
    MSGPACK: msgspec.msgpack.Decoder(InferenceResponse),
}
_error_decoders = {
    JSON: msgspec.json.Decoder(ErrorResponse),
    MSGPACK: msgspec.msgpack.Decoder(ErrorResponse),
}


class _ErrorAnyCode(msgspec.Struct):
    """An error body read with its code as text: a code added after this version."""

    error: str
    code: str
    id: str | None = None


_error_any_code_decoders = {
    JSON: msgspec.json.Decoder(_ErrorAnyCode),
    MSGPACK: msgspec.msgpack.Decoder(_ErrorAnyCode),
}
_encoders: dict[str, msgspec.json.Encoder | msgspec.msgpack.Encoder] = {
    JSON: msgspec.json.Encoder(),
    MSGPACK: msgspec.msgpack.Encoder(),
}

DecodeError = msgspec.DecodeError
ValidationError = msgspec.ValidationError


def decode_request(body: bytes, content_type: str) -> InferenceRequest:
    """Decode a request body; raises `DecodeError` (or its subclass `ValidationError`)."""
    try:  # as `_decode` does, inline: this one decodes every request
        request = _request_decoders[content_type].decode(body)
    except RecursionError:
        raise ValidationError("structure nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise DecodeError(f"invalid UTF-8 in a string: {exc.reason}") from None
    if content_type == JSON:
        _no_base64(request.inputs, "input")
    return request


def decode_response(body: bytes, content_type: str) -> InferenceResponse:
    """Decode a result body; raises as `decode_request` does."""
    response = _decode(_response_decoders[content_type], body)
    if content_type == JSON:
        _no_base64(response.outputs, "output")
    return response


def _no_base64(tensors: list[Tensor], kind: str) -> None:
    """msgspec reads a JSON string as base64 for `memoryview`: raw bytes are msgpack's
    alone, and the same body must mean the same in both."""
    for tensor in tensors:
        if type(tensor.data) is memoryview:
            raise ValidationError(
                f"{kind} {tensor.name!r}: JSON data is a list of values, not a string"
            )


def decode_error(body: bytes, content_type: str) -> ErrorResponse:
    """Decode an error body; raises as `decode_request` does. A code this version does not
    know (a newer worker's) is kept as its text, with the worker's message."""
    try:
        return _decode(_error_decoders[content_type], body)
    except ValidationError:
        error = _decode(_error_any_code_decoders[content_type], body)
        return ErrorResponse(error.error, error.code, error.id)  # type: ignore[arg-type]


def _decode(decoder: msgspec.json.Decoder | msgspec.msgpack.Decoder, body: bytes) -> Any:
    try:
        return decoder.decode(body)
    except RecursionError:  # hostile nesting: a validation error like any other
        raise ValidationError("structure nested too deeply") from None
    except UnicodeDecodeError as exc:  # msgpack strings that are not UTF-8
        raise DecodeError(f"invalid UTF-8 in a string: {exc.reason}") from None


def encode(message: Any, content_type: str) -> bytes:
    """Encode any contract Struct in the given content type."""
    return _encoders[content_type].encode(message)


def json_schema() -> dict[str, Any]:
    """JSON Schema for the request, response and error bodies."""
    _, components = msgspec.json.schema_components(
        [InferenceRequest, InferenceResponse, ErrorResponse],
        ref_template="#/$defs/{name}",
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Surge wire contract (Open Inference Protocol v2 bodies)",
        "$defs": components,
    }
