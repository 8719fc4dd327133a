"""How long the calling thread has waited runnable for a CPU (Linux schedstat).

A model call's clock time includes whatever time the machine gave the call's CPU to another
process. On a busy machine that is most of what makes a fast model's call look slow, and
judged by its clock time alone such a model would leave the event loop for a thread for
the machine's doing, not its own.
"""

from __future__ import annotations

import os
import threading


class _Schedstat:
    """A thread's own schedstat file, open while the thread lives."""

    def __init__(self) -> None:
        try:
            self.fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            self.fd = -1

    def __del__(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)


_threads = threading.local()  # each thread's `_Schedstat`, dropped with the thread


def waited_s() -> float:
    """Seconds the calling thread has waited runnable for a CPU since it began (0.0 where
    the kernel does not say: not Linux, or scheduler statistics compiled out)."""
    stat = getattr(_threads, "stat", None)
    if stat is None:
        stat = _threads.stat = _Schedstat()
    if stat.fd < 0:
        return 0.0
    try:
        return int(os.pread(stat.fd, 64, 0).split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0
