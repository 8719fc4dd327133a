"""structlog set-up: JSON lines in production, readable console output on a terminal."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable

import structlog

# aiokafka logs a write it retries at every try (ten times a second while a partition refuses
# every write) and a connection it cannot make at every attempt: once a message has been
# logged, the same one again within this time is counted, not written.
REPEATS_EVERY_S = 10.0


def configure(level: str = "info", fmt: str = "auto") -> None:
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer = (
        structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
    )
    numeric = logging.getLevelNamesMapping()[level.upper()]
    stamped: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *stamped, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # One write per line, newline included: pool members share their supervisor's
        # stderr, and a line split over two writes can interleave with another member's.
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # aiokafka logs through the standard library: keep its warnings, in the same stream and
    # the same format (one JSON object per line, tracebacks included, where that is asked).
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *stamped],
        )
    )
    handler.addFilter(Repeats("aiokafka", REPEATS_EVERY_S))
    logging.basicConfig(level=max(numeric, logging.WARNING), handlers=[handler])


class Repeats(logging.Filter):
    """Lets each distinct message of the loggers under `name` through once per `every_s`; the
    next one to pass says how many were held back meanwhile. Records of other loggers, and
    those carrying an exception, always pass."""

    _KEPT = 1024  # messages remembered: past that, the oldest half is forgotten

    def __init__(
        self, name: str, every_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(name)
        self._every_s = every_s
        self._clock = clock
        self._last: dict[str, tuple[float, int]] = {}  # message: (last let through, held back)
        self._lock = threading.Lock()  # models log from their threads too

    def filter(self, record: logging.LogRecord) -> bool:
        if not super().filter(record) or record.exc_info:
            return True
        try:
            message = record.getMessage()
        except Exception:  # the handler reports a bad format, as without this filter
            return True
        with self._lock:
            now = self._clock()
            last, held = self._last.pop(message, (now - self._every_s, 0))
            if now - last < self._every_s:
                self._last[message] = (last, held + 1)
                return False
            self._last[message] = (now, 0)  # the latest last: insertion order is age order
            if len(self._last) > self._KEPT:
                for old in list(self._last)[: self._KEPT // 2]:
                    del self._last[old]
        if held:
            record.msg = f"{message} (held back {held} times in {now - last:.3g} s)"
            record.args = None
        return True
