"""A watch over model calls that run on the event loop.

The loop cannot time out a call that blocks it, so a thread does. A call still running two
time budgets after it began is hung, as one on an executor thread would be; but with the
loop blocked no graceful stop can run (no heartbeat, no commit, no answer), so the process
exits at once with status 1 and what it had taken in is redelivered from the last commit.
Its restart runs the model on a thread again, under the budget, until it proves fast anew.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import structlog

log = structlog.get_logger("surge.batcher")

_PERIOD_S = 0.25


class InlineWatch:
    """One per process: the event loop runs one call at a time."""

    def __init__(self) -> None:
        # The call on the loop now: (model:version, perf_counter at its start, budget in s).
        # Set and cleared by the loop around each call, read by the watching thread.
        self.call: tuple[str, float, float] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Watch from now on (once a model first runs on the loop)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="inline-watch")
                self._thread.daemon = True  # never what keeps the process up
                self._thread.start()

    def _watch(self) -> None:
        warned: tuple[str, float, float] | None = None
        while True:
            time.sleep(_PERIOD_S)
            call = self.call
            if call is None:
                continue
            model, started, budget = call
            running = time.perf_counter() - started
            if running > 2 * budget:
                log.error("model_hung", model=model, seconds=round(running, 1), on_event_loop=True)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(1)
            if running > budget and call is not warned:
                warned = call
                log.error("model_call_blocks_event_loop", model=model, budget_s=budget)


WATCH = InlineWatch()
