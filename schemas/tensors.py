"""Conversions between wire tensors and numpy arrays, shared by workers and clients."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from surge.schemas.inference import Tensor

# v2 datatype -> numpy dtype; raw bytes on the wire are always little-endian.
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
_DATATYPE_OF = {dtype.newbyteorder("="): name for name, dtype in DATATYPES.items()}


class TensorError(ValueError):
    """A tensor whose datatype, shape or data does not hold together."""


class TensorTooLarge(TensorError):
    """A tensor over the element limit."""


def datatype_of(dtype: np.dtype[Any]) -> str:
    """The v2 datatype name of a numpy dtype."""
    if dtype.kind in "OSU":
        return "BYTES"
    try:
        return _DATATYPE_OF[dtype.newbyteorder("=")]
    except KeyError:
        raise TensorError(f"numpy dtype {dtype} has no v2 datatype") from None


def to_array(tensor: Tensor, max_elements: int | None = None) -> np.ndarray:
    """Build the numpy array a wire tensor describes, zero-copy for raw bytes."""
    dtype = DATATYPES.get(tensor.datatype)
    if dtype is None:
        raise TensorError(f"input {tensor.name!r}: unknown datatype {tensor.datatype!r}")
    count = math.prod(tensor.shape)
    if max_elements is not None and count > max_elements:
        raise TensorTooLarge(
            f"input {tensor.name!r}: {count} elements exceed the limit of {max_elements}"
        )
    data = tensor.data
    if isinstance(data, memoryview):
        if dtype.kind == "O":
            raise TensorError(f"input {tensor.name!r}: BYTES data must be a list, not raw bytes")
        if data.nbytes != count * dtype.itemsize:
            raise TensorError(
                f"input {tensor.name!r}: {data.nbytes} bytes of data, shape {tensor.shape} "
                f"of {tensor.datatype} needs {count * dtype.itemsize}"
            )
        return np.frombuffer(data, dtype=dtype).reshape(tensor.shape)
    try:
        with np.errstate(over="raise", invalid="raise"):  # 1e308 as FP32 is an error, not inf
            array = np.array(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError, FloatingPointError) as exc:
        raise TensorError(f"input {tensor.name!r}: data is not {tensor.datatype}: {exc}") from None
    if array.size != count:
        raise TensorError(
            f"input {tensor.name!r}: {array.size} values do not fill shape {tensor.shape}"
        )
    return array.reshape(tensor.shape)


def from_array(name: str, array: np.ndarray, *, binary: bool) -> Tensor:
    """A wire tensor for an array: raw little-endian bytes when `binary`, else a flat list."""
    datatype = datatype_of(array.dtype)
    if datatype == "BYTES":
        data: list[Any] | bytes = [_text(v) for v in array.ravel().tolist()]
    elif binary:
        data = np.ascontiguousarray(array, dtype=DATATYPES[datatype]).tobytes()
    else:
        data = array.ravel().tolist()
    return Tensor(name=name, shape=list(array.shape), datatype=datatype, data=data)  # type: ignore[arg-type]


def row_tensors(name: str, array: np.ndarray, rows: Sequence[int], *, binary: bool) -> list[Tensor]:
    """Wire tensors for consecutive row ranges of one batch output, e.g. one per request of a
    batch. Raw bytes are converted once for the whole batch and sliced (zero-copy) per range."""
    datatype = datatype_of(array.dtype)
    if not binary or datatype == "BYTES":
        starts = itertools.accumulate(rows, initial=0)
        return [
            from_array(name, array[start : start + count], binary=binary)
            for start, count in zip(starts, rows, strict=False)
        ]
    raw, row_bytes = raw_rows(array, datatype)
    tail = list(array.shape[1:])
    tensors, offset = [], 0
    for count in rows:
        end = offset + count * row_bytes
        tensors.append(
            Tensor(name=name, shape=[count, *tail], datatype=datatype, data=raw[offset:end])
        )
        offset = end
    return tensors


def raw_rows(array: np.ndarray, datatype: str) -> tuple[memoryview, int]:
    """A numeric array's raw little-endian bytes (copied only if it must be) and its bytes
    per row along the first dimension."""
    contiguous = np.ascontiguousarray(array, dtype=DATATYPES[datatype])
    raw = memoryview(contiguous.reshape(-1).view(np.uint8))  # also for zero-sized outputs
    return raw, raw.nbytes // array.shape[0] if array.shape[0] else 0


def _text(value: object) -> object:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
