"""Background loops: a crash, or a cancellation no one asked for, reaches `on_crash`."""

from __future__ import annotations

import asyncio

from surge.workers.tasks import supervised


async def test_a_loop_that_raises_or_ends_cancelled_unasked_is_reported_and_a_stop_is_not() -> None:
    crashes: list[BaseException] = []

    async def raises(error: BaseException) -> None:
        await asyncio.sleep(0)
        raise error

    async def forever() -> None:
        await asyncio.sleep(3600)

    failing = supervised(raises(ValueError("bug")), "failing", crashes.append)
    # A CancelledError raised inside (a future the loop awaited, cancelled by someone else).
    cancelled = supervised(raises(asyncio.CancelledError()), "cancelled", crashes.append)
    stopped = supervised(forever(), "stopped", crashes.append)
    await asyncio.sleep(0.01)
    stopped.cancel()
    await asyncio.gather(failing, cancelled, stopped, return_exceptions=True)
    await asyncio.sleep(0)  # done callbacks
    assert [type(exc) for exc in crashes] == [ValueError, asyncio.CancelledError]
    assert "cancelled ended cancelled" in str(crashes[1])
