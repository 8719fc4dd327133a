"""Offset tracking: what makes at-least-once true.

Requests of one partition finish out of order (other models, split batches, retries). A
partition's committable position is the offset of its oldest unfinished record, or one past
the newest record when all are finished: never beyond a request without a durable result.
"""

from __future__ import annotations

import itertools
import operator
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Generic, TypeVar

P = TypeVar("P")  # a partition key (aiokafka's TopicPartition in the worker)


class _Partition:
    __slots__ = ("finished", "first", "next_position", "pending")

    def __init__(self, first: int) -> None:
        self.first = first  # the first offset tracked
        self.pending: deque[int] = deque()  # tracked offsets, ascending, oldest first
        self.finished: set[int] = set()  # finished offsets not yet at the head of `pending`
        self.next_position = -1  # one past the newest tracked offset

    def position(self) -> int:
        return self.pending[0] if self.pending else self.next_position


class OffsetTracker(Generic[P]):
    def __init__(self) -> None:
        self._partitions: dict[P, _Partition] = {}
        self._committed: dict[P, int] = {}

    def track(self, partition: P, offset: int) -> object:
        """Record a consumed offset. Offsets of a partition arrive in ascending order; one
        that does not restarts the partition's tracking. Returns a token for `finish`: the
        partition's tracking as it is now (revoking or restarting it makes a new one)."""
        state = self._partitions.get(partition)
        if state is None:
            state = self._partitions[partition] = _Partition(offset)
        if offset < state.next_position:
            # The log went backwards (topic recreated, offsets reset): start this partition
            # afresh rather than fail; outcomes of the old records no longer move it.
            state = self._partitions[partition] = _Partition(offset)
            self._committed.pop(partition, None)
        state.pending.append(offset)
        state.next_position = offset + 1
        return state

    def track_all(self, partition: P, offsets: Sequence[int]) -> object | None:
        """`track` for offsets of one partition at once, when they ascend from past its newest
        tracked offset (as a fetch's do): their one token. None: track them one by one."""
        state = self._partitions.get(partition)
        if state is None:
            state = self._partitions[partition] = _Partition(offsets[0])
        if offsets[0] < state.next_position:
            return None
        if not all(map(operator.lt, offsets, itertools.islice(offsets, 1, None))):
            return None
        state.pending.extend(offsets)
        state.next_position = offsets[-1] + 1
        return state

    def finish(self, partition: P, offset: int, token: object = None) -> None:
        """Mark an offset's outcome durable. Outcomes of partitions revoked since, or of
        records tracked before the partition was (token given and no longer current), are
        ignored: the same offset may be in flight again, read anew after a reassignment."""
        state = self._partitions.get(partition)
        if state is None or not state.pending or (token is not None and token is not state):
            return
        if offset == state.pending[0]:
            state.pending.popleft()
            pending, finished = state.pending, state.finished
            while pending and pending[0] in finished:
                finished.discard(pending.popleft())
        elif state.pending[0] < offset < state.next_position:
            state.finished.add(offset)

    def first(self, partition: P) -> int | None:
        """The first offset tracked for a partition (since it was last forgotten)."""
        state = self._partitions.get(partition)
        return None if state is None else state.first

    def current(self, partition: P, token: object) -> bool:
        """Whether a token from `track` still belongs to the partition's tracking."""
        return self._partitions.get(partition) is token

    def pending(self, partitions: Iterable[P] | None = None) -> int:
        """Records tracked and not yet finished, over some partitions or all."""
        keys = self._partitions if partitions is None else partitions
        return sum(
            len(s.pending) - len(s.finished)
            for s in (self._partitions.get(p) for p in keys)
            if s is not None
        )

    def committable(self) -> dict[P, int]:
        """Positions that moved since `committed()` was last told about them."""
        moves = {}
        for partition, state in self._partitions.items():
            position = state.position()
            if position > self._committed.get(partition, -1) and position >= 0:
                moves[partition] = position
        return moves

    def committed(self, positions: dict[P, int]) -> None:
        """Record positions the broker has accepted, of partitions still tracked: a commit
        answered after its partition was forgotten would hold back a later assignment's."""
        for partition, position in positions.items():
            if partition in self._partitions and position > self._committed.get(partition, -1):
                self._committed[partition] = position

    def forget(self, partitions: Iterable[P]) -> None:
        """Drop revoked partitions: their later outcomes no longer move any position."""
        for partition in partitions:
            self._partitions.pop(partition, None)
            self._committed.pop(partition, None)
