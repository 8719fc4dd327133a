"""Pure batch arithmetic: group requests by shape, stack them into one batch, split outputs back."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from surge.workers.intake import Job
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
        arrays = [_rows(part, spec) if type(part) is memoryview else part for part in parts]
        if len(arrays) == 1:
            batch[spec.name] = arrays[0]
        elif spec.pad_value is None or all(a.shape == arrays[0].shape for a in arrays):
            batch[spec.name] = np.concatenate(arrays)
        else:
            batch[spec.name] = _pad_concatenate(arrays, spec.pad_value)
    return batch


def _rows(raw: memoryview | bytearray, spec: TensorSpec) -> np.ndarray:
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
