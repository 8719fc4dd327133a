"""Stable error codes: every failed request ends as a result or dead letter carrying one."""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """Why a request failed. Values are part of the wire contract: never rename one."""

    BAD_ENCODING = "bad_encoding"  # body is not valid JSON / msgpack
    INVALID_REQUEST = "invalid_request"  # decodes, but violates the v2 request schema
    UNSUPPORTED_CONTENT_TYPE = "unsupported_content_type"
    MISSING_ROUTE = "missing_route"  # no model named by the topic or `surge-model`
    INVALID_REPLY_TO = "invalid_reply_to"  # reply target absent, malformed or not allowed
    UNKNOWN_MODEL = "unknown_model"
    UNKNOWN_VERSION = "unknown_version"
    INVALID_INPUT = "invalid_input"  # tensor name, datatype or shape does not fit the model
    TOO_LARGE = "too_large"  # message or tensor over the configured limits
    EXPIRED = "expired"  # `surge-deadline-ms` passed before the model ran
    MODEL_ERROR = "model_error"  # the runtime raised on this request alone
    TIMEOUT = "timeout"  # the batch outlived its time budget
    REPLY_FAILED = "reply_failed"  # the result could not be written to its reply target
    INTERNAL = "internal"
