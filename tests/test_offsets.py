"""The offset tracker, checked exhaustively against a model of what may be committed."""

from __future__ import annotations

import itertools
import random

import pytest

from surge.workers import OffsetTracker


def _safe_position(offsets: list[int], finished: set[int]) -> int:
    """The model: the first unfinished offset, else one past the last."""
    for offset in offsets:
        if offset not in finished:
            return offset
    return offsets[-1] + 1


@pytest.mark.parametrize("order", list(itertools.permutations(range(6))))
def test_every_completion_order_commits_only_a_finished_prefix(order: tuple[int, ...]) -> None:
    offsets = [3, 4, 7, 8, 9, 12]  # gaps, as compaction and transaction markers leave
    tracker: OffsetTracker[str] = OffsetTracker()
    for offset in offsets:
        tracker.track("p", offset)
    finished: set[int] = set()
    for index in order:
        tracker.finish("p", offsets[index])
        finished.add(offsets[index])
        expected = _safe_position(offsets, finished)
        assert tracker.committable().get("p", offsets[0]) == expected
        assert tracker.pending() == len(offsets) - len(finished)
    assert tracker.committable() == {"p": 13}


def test_random_interleavings_over_partitions() -> None:
    rng = random.Random(7)
    for _ in range(200):
        tracker: OffsetTracker[int] = OffsetTracker()
        tracked: dict[int, list[int]] = {0: [], 1: [], 2: []}
        open_: list[tuple[int, int]] = []
        finished: dict[int, set[int]] = {p: set() for p in tracked}
        next_offset = dict.fromkeys(tracked, 0)
        for _ in range(60):
            if open_ and rng.random() < 0.5:
                p, o = open_.pop(rng.randrange(len(open_)))
                tracker.finish(p, o)
                finished[p].add(o)
            else:
                p = rng.choice(list(tracked))
                o = next_offset[p]
                next_offset[p] += rng.randint(1, 3)
                tracker.track(p, o)
                tracked[p].append(o)
                open_.append((p, o))
            positions = tracker.committable()
            for p, offsets in tracked.items():
                if offsets:
                    assert positions.get(p) == _safe_position(offsets, finished[p])


def test_committed_positions_are_not_offered_again() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.track("p", 0)
    tracker.finish("p", 0)
    assert tracker.committable() == {"p": 1}
    tracker.committed({"p": 1})
    assert tracker.committable() == {}
    tracker.track("p", 1)
    assert tracker.committable() == {}
    tracker.finish("p", 1)
    assert tracker.committable() == {"p": 2}


def test_forgotten_partitions_ignore_late_outcomes() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.track("p", 5)
    tracker.forget(["p"])
    tracker.finish("p", 5)
    assert tracker.committable() == {}
    assert tracker.pending() == 0


def test_a_commit_answered_after_its_partition_was_forgotten_holds_nothing_back() -> None:
    """Revoked while its commit of 8 was in flight, assigned again after the log restarted
    lower (a reset after retention): its new positions are offered from the first."""
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.track("p", 7)
    tracker.finish("p", 7)
    offered = tracker.committable()
    tracker.forget(["p"])
    tracker.committed(offered)  # the answer comes back now
    tracker.track("p", 5)
    tracker.finish("p", 5)
    assert tracker.committable() == {"p": 6}


def test_an_offset_going_backwards_restarts_the_partition() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.track("p", 5)
    tracker.track("p", 2)  # the topic was recreated: offsets start over
    assert tracker.committable() == {"p": 2}
    tracker.finish("p", 2)
    assert tracker.committable() == {"p": 3}


def test_outcomes_from_before_a_reassignment_move_nothing() -> None:
    """Revoked with work in flight, then assigned again: the old outcome of offset 2 must
    not commit past the new, still running, read of offset 2."""
    tracker: OffsetTracker[str] = OffsetTracker()
    old = [tracker.track("p", offset) for offset in (2, 3, 4)]
    tracker.forget(["p"])
    new = tracker.track("p", 2)
    tracker.finish("p", 2, old[0])
    assert tracker.committable() == {"p": 2}  # not past the new read of 2
    assert not tracker.current("p", old[0])
    assert tracker.current("p", new)
    tracker.finish("p", 2, new)
    assert tracker.committable() == {"p": 3}


def test_a_run_of_ascending_offsets_is_tracked_at_once() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    token = tracker.track_all("p", [5, 6, 8])
    assert token is not None
    assert tracker.current("p", token)
    tracker.finish("p", 6, token)
    tracker.finish("p", 5, token)
    assert tracker.committable() == {"p": 8}
    tracker.finish("p", 8, token)
    assert tracker.committable() == {"p": 9}
    # Not past the newest, or not ascending: left to `track`, one by one.
    assert tracker.track_all("p", [8, 9]) is None
    assert tracker.track_all("p", [10, 12, 11]) is None
    assert tracker.pending() == 0
