"""Background loops: a crash, or a cancellation no one asked for, reaches `on_crash`."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from surge.workers.tasks import supervised, within


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


@pytest.mark.parametrize("turns", [0, 1, 2, 3])
async def test_a_loop_waiting_within_a_bound_ends_when_cancelled_as_its_wait_ends(
    turns: int,
) -> None:
    """A loop's bounded wait whose future is resolved just before the loop is cancelled: with
    Python 3.11's `asyncio.wait_for`, the cancellation was lost for the first few event-loop
    turns and the loop ran on for good (a worker stuck at shutdown)."""
    woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def loop() -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await within(asyncio.shield(woken), 5)
            await asyncio.sleep(0.05)

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.01)
    woken.set_result(None)
    for _ in range(turns):
        await asyncio.sleep(0)
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=1)
    assert done, "the loop outlived its cancellation"
