"""The client side: publish requests, await results."""

from surge.producers.client import ClientClosed, NotSent, Result, SurgeClient
from surge.producers.requests import (
    Prediction,
    PredictionError,
    read_redis_result,
    read_result,
    request_body,
    request_headers,
)
from surge.producers.scoring import ScoreReport, score_lines
from surge.producers.sync import SyncClient

__all__ = [
    # clients
    "SurgeClient",
    "SyncClient",
    # results
    "Prediction",
    "PredictionError",
    "ClientClosed",
    "NotSent",
    "Result",
    # files
    "score_lines",
    "ScoreReport",
    # building and reading records by hand
    "request_body",
    "request_headers",
    "read_result",
    "read_redis_result",
]
