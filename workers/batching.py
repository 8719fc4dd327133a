"""Pure batch arithmetic: group requests by shape, stack them into one batch, split outputs back."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from surge.workers.intake import Job
from surge.workers.runtimes import TensorSpec


def group_by_shape(jobs: Sequence[Job], specs: Sequence[TensorSpec]) -> list[list[Job]]:
    """Jobs whose unpadded inputs agree in shape can share a model call; others go apart."""
    if all(spec.pad_value is not None or -1 not in spec.shape for spec in specs):
        return [list(jobs)]  # admitted jobs all fit the fixed shapes: one call
    groups: dict[tuple[object, ...], list[Job]] = {}
    for job in jobs:
        key = tuple(
            _array(job.inputs[spec.name], spec).shape[1:] if spec.pad_value is None else None
            for spec in specs
        )
        groups.setdefault(key, []).append(job)
    return list(groups.values())


def stack(jobs: Sequence[Job], specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """One array per input along the batch dimension, padding variable dims where configured."""
    batch: dict[str, np.ndarray] = {}
    for spec in specs:
        parts = [job.inputs[spec.name] for job in jobs]
        if all(type(part) is memoryview for part in parts):  # raw rows: one join, one array
            joined = parts[0] if len(parts) == 1 else b"".join(parts)
            batch[spec.name] = np.frombuffer(joined, spec.dtype).reshape(-1, *spec.shape)
            continue
        arrays = [_array(part, spec) for part in parts]
        if len(arrays) == 1:
            batch[spec.name] = arrays[0]
        elif spec.pad_value is None or all(a.shape == arrays[0].shape for a in arrays):
            batch[spec.name] = np.concatenate(arrays)
        else:
            batch[spec.name] = _pad_concatenate(arrays, spec.pad_value)
    return batch


def _array(part: np.ndarray | memoryview, spec: TensorSpec) -> np.ndarray:
    if type(part) is memoryview:
        return np.frombuffer(part, spec.dtype).reshape(-1, *spec.shape)
    return part  # type: ignore[return-value]


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
