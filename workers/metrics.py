"""Prometheus metrics, updated per batch rather than per request to keep the hot path lean."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

RESULTS = Counter(
    "surge_results_total",
    "Results of model calls answered, by model and status (ok); errors: surge_errors_total",
    ["model", "status"],
)
ERRORS = Counter(
    "surge_errors_total",
    "Requests answered with an error (a result, or a dead letter where there is no reply "
    "target), by error code (expired, timeout, model_error...): once per request",
    ["code"],
)
DEAD_LETTERS = Counter(
    "surge_dead_letters_total",
    "Records sent to the dead-letter topic, by error code (reply_failed: a result, ok or "
    "not, its reply target refused)",
    ["code"],
)
BATCH_ROWS = Histogram(
    "surge_batch_rows",
    "Rows per model call",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
)
BATCH_SECONDS = Histogram(
    "surge_batch_seconds",
    "Model call duration",
    ["model"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
)
QUEUE_SECONDS = Histogram(
    "surge_queue_seconds",
    "Time from consume to batch start, oldest request of each batch",
    ["model"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 5),
)
RECORD_AGE = Histogram(
    "surge_record_age_seconds",
    "Age of records when taken in (now minus the record timestamp), first record of each "
    "partition's share of a fetch: how far behind its topics the worker runs, in time",
    ["topic"],
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 300, 900),
)
OUTCOME_SECONDS = Histogram(
    "surge_outcome_seconds",
    "Time from taking a record in to its result or dead letter being durable (acknowledged, "
    "committed in its transaction, or stored in Redis), oldest record of each write",
    ["target"],
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30),
)
_OUTCOMES = {target: OUTCOME_SECONDS.labels(target) for target in ("kafka", "redis")}
QUEUED_SECONDS = Gauge(
    "surge_queued_seconds",
    "Model time to run what is queued in this worker, by model, at the speed of its recent calls",
    ["model"],
)
IN_FLIGHT = Gauge("surge_in_flight_requests", "Consumed records without a durable outcome")
IN_FLIGHT_BYTES = Gauge(
    "surge_in_flight_bytes",
    "Bytes of those records and of their encoded outcomes not yet durable (max_in_flight_bytes)",
)
PAUSED = Gauge("surge_paused", "1 while partitions are paused for backpressure")
FETCH_STOPPED = Gauge(
    "surge_fetch_stopped",
    "1 while a model's topics are not fetched: fetch_ahead_s of its work is queued here",
    ["model"],
)
REPLY_RETRIES = Counter("surge_reply_retries_total", "Result writes retried", ["target"])
QUARANTINED = Gauge(
    "surge_quarantined_partitions",
    "Reply partitions written on a producer of their own since their writes went unacknowledged "
    "for reply_retry_s, until one is acknowledged (at least once)",
)


def outcomes_durable(target: str, received: Iterable[float]) -> None:
    """One write became durable: observe its oldest record's time since it was taken in
    (`received`: the records' `time.monotonic()` at intake)."""
    oldest = min(received, default=None)
    if oldest is not None:
        _OUTCOMES[target].observe(time.monotonic() - oldest)


# Ready once started (models loaded, consumer up), until a stop begins: `/ready` answers 200
# then, 503 otherwise, for a readiness probe to pace a rollout by.
_READY = threading.Event()


def set_ready(ready: bool) -> None:
    if ready:
        _READY.set()
    else:
        _READY.clear()


def serve(port: int) -> None:
    """Expose /metrics and /ready on `port` (0: do nothing), from a thread of their own."""
    if not port:
        return
    metrics = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/ready":
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        ready = _READY.is_set()
        status = "200 OK" if ready else "503 Service Unavailable"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [b"ready\n" if ready else b"starting or stopping\n"]

    server = make_server("0.0.0.0", port, app, ThreadingWSGIServer, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Not a line per scrape on stderr."""
