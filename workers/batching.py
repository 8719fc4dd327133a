"""Pure batch arithmetic: group requests by shape, stack them into one batch, split outputs back."""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence

import numpy as np

from surge.workers.intake import Job, RawRows
from surge.workers.runtimes import TensorSpec


def group_by_shape(jobs: Sequence[Job], specs: Sequence[TensorSpec]) -> list[list[Job]]:
    """Jobs whose unpadded inputs agree in shape can share a model call; others go apart."""
    # Admitted jobs already fit every fixed shape: only unpadded variable dims can differ.
    varying = [spec.name for spec in specs if spec.pad_value is None and -1 in spec.shape]
    if not varying:
        return [list(jobs)]
    groups: dict[tuple[object, ...], list[Job]] = {}
    for job in jobs:
        key = tuple(job.inputs[name].shape[1:] for name in varying)  # type: ignore[union-attr]
        groups.setdefault(key, []).append(job)
    return list(groups.values())


def stack(jobs: Sequence[Job], specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """One array per input along the batch dimension, padding variable dims where configured."""
    batch: dict[str, np.ndarray] = {}
    for spec in specs:
        parts = [job.inputs[spec.name] for job in jobs]
        if all(type(part) is memoryview for part in parts):
            # Raw rows: one join, one array (writable, so no runtime needs to copy it).
            batch[spec.name] = _rows(bytearray().join(parts), spec)
            continue
        arrays = [_array(part, spec) for part in parts]
        if len(arrays) == 1:
            batch[spec.name] = arrays[0]
        elif spec.pad_value is None or all(a.shape == arrays[0].shape for a in arrays):
            batch[spec.name] = np.concatenate(arrays)
        else:
            batch[spec.name] = _pad_concatenate(arrays, spec.pad_value)
    return batch


def _array(part: np.ndarray | memoryview | RawRows, spec: TensorSpec) -> np.ndarray:
    """A job's rows of one input as an array."""
    if type(part) is memoryview:
        return _rows(part, spec)
    if type(part) is RawRows:
        return _rows(part.block(), spec)
    return part  # type: ignore[return-value]


def _rows(raw: memoryview | bytearray | np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Raw little-endian rows of a fixed-shape input as an array."""
    return np.frombuffer(raw, spec.dtype).reshape(-1, *spec.shape)


def _pad_concatenate(arrays: Sequence[np.ndarray], pad_value: float) -> np.ndarray:
    rows = sum(a.shape[0] for a in arrays)
    dims = tuple(max(sizes) for sizes in zip(*(a.shape[1:] for a in arrays), strict=True))
    out = np.full((rows, *dims), pad_value, dtype=arrays[0].dtype)
    start = 0
    for a in arrays:
        out[(slice(start, start + a.shape[0]), *(slice(0, d) for d in a.shape[1:]))] = a
        start += a.shape[0]
    return out


def check_rows(outputs: dict[str, np.ndarray], rows: int) -> None:
    """Every output must have one row per input row; raises ValueError otherwise."""
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != rows:
            raise ValueError(f"output {name!r} has {array.shape[:1]} rows for a batch of {rows}")


_NEAR_BEST = 0.95  # of the best run's speed: a run this fast with more rows goes instead


class CallCost:
    """A model call's time as fixed + per_element × padded elements, fitted by least squares
    over recent calls (older ones weigh less): what padding a row costs against what one more
    call costs."""

    def __init__(self, decay: float = 0.98) -> None:
        self._decay = decay
        self._sums = np.zeros(5)  # weight, x, y, x², xy

    def observe(self, elements: int, seconds: float) -> None:
        x = float(elements)
        self._sums = self._sums * self._decay + (1.0, x, seconds, x * x, x * seconds)

    def fit(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per element), or None until calls of different sizes
        show a cost that grows with size (by 1% of a call of the average size, at least)."""
        w, x, y, xx, xy = (float(total) for total in self._sums)
        spread = w * xx - x * x
        if w == 0 or spread <= 1e-12 * w * xx:
            return None
        per_element = (w * xy - x * y) / spread
        if per_element * x < 0.01 * y:
            return None
        return max(0.0, (y - per_element * x) / w), per_element


def best_run(
    lengths: Sequence[int],
    rows: Sequence[int],
    anchor: int,
    limit: int,
    cost: tuple[float, float],
) -> tuple[int, int]:
    """The run [start, stop) of jobs sorted by padded length (`lengths` ascending, `rows`
    each) to batch: it holds `anchor` and at most `limit` rows, and pads little. Of the runs
    within `_NEAR_BEST` of the most real elements per second of model time (padded to their
    longest; `cost`: `CallCost.fit()`), the one with the most rows: leaving a row behind must
    buy real speed."""
    fixed, per_element = cost
    useful = [0]  # prefix sums: real elements, rows
    taken = [0]
    for length, count in zip(lengths, rows, strict=True):
        useful.append(useful[-1] + length * count)
        taken.append(taken[-1] + count)
    # Taking more or fewer jobs of one length moves a run's speed toward theirs, monotonically:
    # the best run starts where a length starts (or at the anchor) and stops where one ends,
    # unless the row limit cuts it there. So the candidates are those boundaries, and for
    # each possible start (stop) the furthest stop (nearest start) within the limit: a few
    # thousand at most, where every run would be limit².
    first = bisect_left(taken, taken[anchor + 1] - limit)  # the earliest start in the limit
    last = bisect_right(taken, taken[anchor] + limit) - 1  # the furthest stop in the limit
    edges = [i for i in range(first + 1, last) if lengths[i] != lengths[i - 1]]
    starts = [start for start in {first, *edges, anchor} if start <= anchor]
    stops = [stop for stop in (*edges, last) if stop > anchor]
    candidates = {
        (start, stop) for start in starts for stop in stops if taken[stop] - taken[start] <= limit
    }
    for start in range(first, anchor + 1):
        candidates.add((start, bisect_right(taken, taken[start] + limit) - 1))
    for stop in range(anchor + 1, last + 1):
        candidates.add((bisect_left(taken, taken[stop] - limit), stop))
    runs: list[tuple[float, int, int, int]] = []  # score, rows, start, stop
    for start, stop in candidates:
        taking = taken[stop] - taken[start]
        seconds = max(fixed + per_element * taking * lengths[stop - 1], 1e-12)
        runs.append(((useful[stop] - useful[start]) / seconds, taking, start, stop))
    best = max(score for score, *_ in runs)
    _, _, start, stop = max(  # the most rows, then the fastest of those
        (run for run in runs if run[0] >= _NEAR_BEST * best), key=lambda run: (run[1], run[0])
    )
    return start, stop
