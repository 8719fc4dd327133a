"""Kafka header names and values: the routing half of the wire contract.

Workers route on headers alone, so a request reaches its model, version and reply target
without its body being decoded.
"""

from __future__ import annotations

import enum

# Request headers.
MODEL = "surge-model"
VERSION = "surge-version"
REPLY_TO = "surge-reply-to"
DEADLINE_MS = "surge-deadline-ms"
CONTENT_TYPE = "content-type"

# Result headers (the request id, status and content type are always present).
REQUEST_ID = "surge-request-id"
STATUS = "surge-status"
ERROR_CODE = "surge-error-code"

# Dead-letter headers, added to the original request's headers.
ERROR_MESSAGE = "surge-error"
SOURCE_TOPIC = "surge-source-topic"
SOURCE_PARTITION = "surge-source-partition"
SOURCE_OFFSET = "surge-source-offset"
# A record `surge dlq replay` adds to a dead-letter topic once it has re-published a letter:
# "<partition>:<offset>" of that letter. It carries no body and is no dead letter itself.
REPLAYED = "surge-replayed"
# On a request `surge dlq replay` re-published: how many times its request was replayed. Kept
# on a dead letter of it, this tells a letter of a replay (which may be replayed in turn) from
# one the replay replaced.
REPLAYS = "surge-replays"

# `surge-reply-to: redis` sends the result to Redis instead of a Kafka topic.
REPLY_TO_REDIS = "redis"

JSON = "application/json"
MSGPACK = "application/msgpack"
CONTENT_TYPES = (JSON, MSGPACK)


class Status(enum.StrEnum):
    """The `surge-status` header of a result."""

    OK = "ok"
    ERROR = "error"
    EXPIRED = "expired"
