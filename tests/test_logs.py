"""Log lines stay whole when processes share one stderr, as the members of a pool do."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from surge.workers.logs import Repeats

_WRITER = """
import structlog
from surge.workers.logs import configure
configure("info", "json")
log = structlog.get_logger("test")
for i in range(5000):
    log.info("model_loading", model="mlp", path="/models/mlp/1/model.onnx" * 4, i=i)
"""


def test_processes_sharing_stderr_never_split_a_line(tmp_path: Path) -> None:
    log = tmp_path / "shared.log"
    with log.open("ab") as shared:
        writers = [
            subprocess.Popen([sys.executable, "-c", _WRITER], stderr=shared) for _ in range(3)
        ]
        for writer in writers:
            assert writer.wait(60) == 0
    lines = log.read_text().splitlines()
    assert len(lines) == 15_000
    assert all(json.loads(line)["event"] == "model_loading" for line in lines)


_LIBRARY = """
import logging
from surge.workers.logs import configure
configure("info", "json")
logging.getLogger("aiokafka.producer").warning("Got error produce response: %s", "NoReplicas")
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("aiokafka.consumer").exception("Unexpected error in fetcher routine")
"""


def test_what_libraries_log_is_json_lines_too_tracebacks_included() -> None:
    """A log shipper parsing JSON lines must not meet a plain or multi-line one."""
    run = subprocess.run([sys.executable, "-c", _LIBRARY], capture_output=True, text=True)
    assert run.returncode == 0
    produce, fetch = map(json.loads, run.stderr.splitlines())
    assert produce["event"] == "Got error produce response: NoReplicas"
    assert (produce["logger"], produce["level"]) == ("aiokafka.producer", "warning")
    assert "timestamp" in produce
    assert (fetch["logger"], fetch["level"]) == ("aiokafka.consumer", "error")
    assert fetch["exception"].endswith("ZeroDivisionError: division by zero")


def test_a_message_repeated_is_written_once_per_period_with_a_count() -> None:
    """aiokafka logs a retried write at every try: the same message is let through once per
    period, and the next to pass says how many were held back."""
    now = [100.0]
    repeats = Repeats("aiokafka", 10, clock=lambda: now[0])

    def passes(message: str, *args: object, name: str = "aiokafka.producer") -> str | None:
        record = logging.LogRecord(name, logging.WARNING, "", 0, message, args, None)
        return record.getMessage() if repeats.filter(record) else None

    retrying = "Got error produce response on %s, retrying"
    assert passes(retrying, "refusing-0") == "Got error produce response on refusing-0, retrying"
    now[0] += 9.9
    assert [passes(retrying, "refusing-0") for _ in range(5)] == [None] * 5
    other = passes(retrying, "refusing-1")  # another partition: a message of its own
    assert other == "Got error produce response on refusing-1, retrying"
    now[0] += 0.35
    again = passes(retrying, "refusing-0")
    assert again == f"{retrying % 'refusing-0'} (held back 5 times in 10.2 s)"
    assert passes(retrying, "refusing-0") is None
    # Another library's records, and a bad format (reported by the handler), always pass.
    assert [passes("same", name="asyncio") for _ in range(2)] == ["same", "same"]
    bad = logging.LogRecord("aiokafka", logging.WARNING, "", 0, "%d", ("x",), None)
    assert repeats.filter(bad)


def test_distinct_messages_past_the_limit_forget_the_oldest() -> None:
    now = [0.0]
    repeats = Repeats("aiokafka", 10, clock=lambda: now[0])

    def passes(message: str) -> bool:
        return repeats.filter(logging.LogRecord("aiokafka", 30, "", 0, message, None, None))

    assert all(passes(f"m{i}") for i in range(3000))
    assert not passes("m2999")  # recent: remembered
    assert passes("m0")  # forgotten: lets through again
