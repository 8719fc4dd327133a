"""The ledger: every consumed record from admission until its outcome is durable.

It joins the offset tracker with the in-flight bounds that drive backpressure, and lets
tasks wait for progress without polling.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

from aiokafka import TopicPartition

from surge.workers.offsets import OffsetTracker
from surge.workers.tickets import Ticket


class Ledger:
    def __init__(self, max_records: int, max_bytes: int) -> None:
        self.offsets: OffsetTracker[TopicPartition] = OffsetTracker()
        self._max_records = max_records
        self._max_bytes = max_bytes
        self.records = 0
        self.bytes = 0
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def full(self) -> bool:
        return self.records >= self._max_records or self.bytes >= self._max_bytes

    @property
    def has_room(self) -> bool:
        """Below the low-water mark (half of each bound): hysteresis against pause flapping."""
        return self.records <= self._max_records // 2 and self.bytes <= self._max_bytes // 2

    def room_for(self, count: int, each: int) -> int:
        """How many of `count` records of `each` bytes fit under both bounds; at least one
        (of a `count` above 0), so that a record larger than the whole bound still goes
        through, alone."""
        records = self._max_records - self.records
        fits = records if each <= 0 else min(records, (self._max_bytes - self.bytes) // each)
        return min(count, max(1, fits))

    def admit(self, ticket: Ticket) -> None:
        """Track the ticket's record; it counts against the bounds with all it holds
        (`Ticket.size`)."""
        ticket.tracking = self.offsets.track(ticket.tp, ticket.offset)
        self.records += 1
        self.bytes += ticket.size

    def admit_all(self, tickets: Sequence[Ticket]) -> None:
        """`admit` for a run of tickets of one partition, in the order of their offsets."""
        offsets = self.offsets
        token = offsets.track_all(tickets[0].tp, [ticket.offset for ticket in tickets])
        if token is None:
            for ticket in tickets:
                ticket.tracking = offsets.track(ticket.tp, ticket.offset)
        else:
            for ticket in tickets:
                ticket.tracking = token
        self.records += len(tickets)
        self.bytes += sum([ticket.size for ticket in tickets])

    def hold(self, ticket: Ticket, size: int) -> None:
        """The ticket's outcome takes `size` bytes until it is durable: first as expected
        when the request is queued (so that a model's large outputs pause fetching before
        they exist), then as encoded. It counts against the bytes bound too, or results that
        a slow reply target holds back would grow without one."""
        self.bytes += size - ticket.held
        ticket.held = size

    def hold_all(self, tickets: Sequence[Ticket], sizes: Sequence[int]) -> None:
        """`hold` for many tickets at once."""
        change = 0
        for ticket, size in zip(tickets, sizes, strict=True):
            change += size - ticket.held
            ticket.held = size
        self.bytes += change

    def settle_all(self, tickets: Iterable[Ticket]) -> None:
        """The tickets' results or dead letters are durable (an acknowledged record batch's):
        `finish_all` and `release_all` in one, waking waiters once. Settling twice changes
        nothing."""
        finish = self.offsets.finish
        records = size = 0
        for ticket in tickets:  # `finish_all` and `release_all` in one pass
            if not ticket.settled:
                ticket.settled = True
                finish(ticket.tp, ticket.offset, ticket.tracking)
                records += 1
                size += ticket.size + ticket.held
        self.records -= records
        self.bytes -= size
        self._wake()

    def finish_all(self, tickets: Iterable[Ticket]) -> None:
        """The tickets' outcomes are decided: their offsets may be committed with them (in
        exactly-once mode, in the same transaction). They still count as in flight."""
        finish = self.offsets.finish
        for ticket in tickets:
            if not ticket.settled:
                ticket.settled = True
                finish(ticket.tp, ticket.offset, ticket.tracking)
        self._wake()

    def current(self, ticket: Ticket) -> bool:
        """Whether the ticket's partition is still tracked as when it was admitted (not
        revoked since, even if assigned again)."""
        return self.offsets.current(ticket.tp, ticket.tracking)

    def release_all(self, tickets: Iterable[Ticket]) -> None:
        """Stop counting the tickets as in flight (once each, after `finish_all`), waking
        waiters once."""
        records = size = 0
        for ticket in tickets:
            records += 1
            size += ticket.size + ticket.held
        if records:
            self.records -= records
            self.bytes -= size
            self._wake()

    def _wake(self) -> None:
        if self._waiters:
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._waiters.clear()

    async def progress(self) -> None:
        """Return after the next settlement."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:  # a caller that gave up (a timeout cancelled the waiter) leaves nothing behind
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    async def room(self) -> None:
        """Return once the in-flight load is back under the low-water mark."""
        while not self.has_room:
            await self.progress()

    async def drained(
        self, partitions: Iterable[TopicPartition] | None = None, *, leaving: int = 0
    ) -> None:
        """Return once no record of these partitions (or of any) is in flight, but for
        `leaving` records that never will settle."""
        keys = None if partitions is None else list(partitions)
        while self.offsets.pending(keys) > leaving:
            await self.progress()
