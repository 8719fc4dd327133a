"""Background-task plumbing: a queue that a loop drains, and tasks whose crash stops the
worker instead of leaving it to limp on."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

log = structlog.get_logger("surge.tasks")

T = TypeVar("T")


async def within(awaitable: Awaitable[T], seconds: float) -> T:
    """`asyncio.wait_for`, without its flaw in Python 3.11: there, a task cancelled just as
    the awaited thing finishes gets its result instead of the cancellation, and a loop
    cancelled that way (a worker's, at shutdown) runs on for good. Raises TimeoutError."""
    async with asyncio.timeout(seconds):
        return await awaitable


@dataclass(slots=True)
class Outbox:
    items: deque[Any] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def put(self, item: Any) -> None:
        self.items.append(item)
        self.wake.set()

    async def take(self, limit: int | None = None) -> list[Any]:
        """Wait for items, then take them all (or `limit` of them)."""
        while not self.items:
            self.wake.clear()
            await self.wake.wait()
        count = len(self.items) if limit is None else min(limit, len(self.items))
        return [self.items.popleft() for _ in range(count)]


def supervised(
    loop: Coroutine[Any, Any, None], name: str, on_crash: Callable[[BaseException], None]
) -> asyncio.Task[None]:
    """Run a background loop; if it ever raises, or ends cancelled with no one having asked
    (a CancelledError raised inside it), `on_crash` hears of it."""

    def check(task: asyncio.Task[None]) -> None:
        if task.cancelled():
            if task.cancelling():  # stopped on purpose
                return
            exc: BaseException | None = asyncio.CancelledError(f"{name} ended cancelled")
        else:
            exc = task.exception()
        if exc is not None:
            log.error("background_loop_crashed", task=name, error=repr(exc))
            on_crash(exc)

    task = asyncio.create_task(loop, name=name)
    task.add_done_callback(check)
    return task
