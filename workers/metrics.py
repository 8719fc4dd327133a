"""Prometheus metrics, updated per batch rather than per request to keep the hot path lean."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RESULTS = Counter(
    "surge_results_total", "Outcomes written, by model and status", ["model", "status"]
)
DEAD_LETTERS = Counter(
    "surge_dead_letters_total", "Records sent to the dead-letter topic", ["code"]
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
IN_FLIGHT = Gauge("surge_in_flight_requests", "Consumed records without a durable outcome")
PAUSED = Gauge("surge_paused", "1 while partitions are paused for backpressure")
REPLY_RETRIES = Counter("surge_reply_retries_total", "Result writes retried", ["target"])


def serve(port: int) -> None:
    """Expose /metrics on `port` (0: do nothing)."""
    if port:
        start_http_server(port)
