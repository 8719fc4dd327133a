"""Conversions between wire tensors and numpy arrays, shared by workers and clients."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
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
        array = np.frombuffer(data, dtype=dtype)
        if dtype.kind == "b" and array.view(np.uint8).max(initial=0) > 1:
            # numpy reads any nonzero byte as true, yet keeps it: models would see 2 and 255.
            raise TensorError(f"input {tensor.name!r}: BOOL bytes must be 0 or 1")
        return _shaped(array, tensor)
    array = _from_values(data, dtype, tensor)
    if array.size != count:
        raise TensorError(
            f"input {tensor.name!r}: {array.size} values do not fill shape {tensor.shape}"
        )
    return _shaped(array, tensor)


def _shaped(array: np.ndarray, tensor: Tensor) -> np.ndarray:
    try:  # an empty tensor can name dimensions no array may have: [0, 2**63]
        return array.reshape(tensor.shape)
    except ValueError as exc:
        raise TensorError(f"input {tensor.name!r}: shape {tensor.shape}: {exc}") from None


def _from_values(data: Any, dtype: np.dtype[Any], tensor: Tensor) -> np.ndarray:
    """The array of a list of values, which must be of the datatype's kind: numpy itself
    would turn "12" into 12, 1.7 into 1 and 0.1 into True."""
    if dtype.kind == "O":
        # Flat first: numpy would keep lists nested deeper than the shape as elements.
        try:
            values = list(_flat(data))
        except RecursionError:
            raise TensorError(f"input {tensor.name!r}: data nested too deeply") from None
        if not all(isinstance(value, str | bytes) for value in values):
            raise TensorError(f"input {tensor.name!r}: BYTES data must be strings")
        array = np.empty(len(values), dtype=dtype)
        array[:] = values
        return array
    try:
        values = np.array(data)
        if values.dtype.kind == "O" and dtype.kind == "f" and _numbers_or_null(data):
            # JSON has no NaN: null stands for it (and for the infinities) in float tensors.
            values = np.array(data, dtype=np.float64)
    except (ValueError, TypeError, OverflowError) as exc:  # ragged, say
        raise TensorError(f"input {tensor.name!r}: data is not {tensor.datatype}: {exc}") from None
    kind = values.dtype.kind
    if not values.size:
        return values.astype(dtype)
    if dtype.kind in "iu" and (kind == "O" or (kind == "f" and np.abs(values).max() >= _EXACT)):
        return _exact_integers(data, dtype, tensor)
    if kind in "iuf" and _holds_bools(data, values.ndim):  # numpy made true 1 beside numbers
        if dtype.kind == "b":  # numpy would make 2 and 0.5 true too
            raise TensorError(
                f"input {tensor.name!r}: data is not BOOL: it holds numbers beside true and false"
            )
        kind = "b"
    if kind not in _TAKES[dtype.kind]:
        what = _KIND_NAMES.get(kind, "other values")
        raise TensorError(f"input {tensor.name!r}: data is not {tensor.datatype}: it holds {what}")
    if dtype.kind in "iu":
        if kind == "f" and not (np.isfinite(values).all() and (values == np.trunc(values)).all()):
            raise TensorError(
                f"input {tensor.name!r}: data is not {tensor.datatype}: it holds fractions"
            )
        limits = np.iinfo(dtype)
        if values.min() < limits.min or values.max() > limits.max:
            raise TensorError(
                f"input {tensor.name!r}: data is not {tensor.datatype}: values outside "
                f"[{limits.min}, {limits.max}]"
            )
    try:
        with np.errstate(over="raise", invalid="raise"):  # 1e308 as FP32 is an error, not inf
            return values.astype(dtype)
    except (ValueError, TypeError, OverflowError, FloatingPointError) as exc:
        raise TensorError(f"input {tensor.name!r}: data is not {tensor.datatype}: {exc}") from None


def _exact_integers(data: Any, dtype: np.dtype[Any], tensor: Tensor) -> np.ndarray:
    """Integers taken one by one: numpy makes a list that mixes integers past 2**63 with
    others, or large integers with whole floats, float64 or object, and would round them."""
    limits = np.iinfo(dtype)
    values = []
    for value in _flat(data):
        if type(value) is float and value.is_integer() and abs(value) < _EXACT:
            value = int(value)
        if type(value) is not int:
            what = "other values"
            if type(value) is float:
                what = (
                    "fractions"
                    if not value.is_integer()
                    else f"{value:g}, a float too big to be exact"
                )
            raise TensorError(
                f"input {tensor.name!r}: data is not {tensor.datatype}: it holds {what}"
            )
        if not limits.min <= value <= limits.max:
            raise TensorError(
                f"input {tensor.name!r}: data is not {tensor.datatype}: values outside "
                f"[{limits.min}, {limits.max}]"
            )
        values.append(value)
    return np.array(values, dtype=dtype)


_EXACT = 2**53  # float64 holds every integer below this magnitude exactly
# The kinds of numpy array a list may make for each kind of datatype: integers take whole
# floats (JSON writes 3 as 3.0 at times), floats take integers, BOOL only true/false.
_TAKES = {"b": "b", "i": "iuf", "u": "iuf", "f": "iuf"}
_KIND_NAMES = {"b": "true/false", "i": "numbers", "u": "numbers", "f": "numbers", "U": "text"}


def _numbers_or_null(data: Any) -> bool:
    return all(value is None or type(value) in (int, float) for value in _flat(data))


def _holds_bools(data: list[Any], depth: int) -> bool:
    """Whether lists nested `depth` deep (as evenly as an array's dimensions) hold true or
    false anywhere; one pass, in C."""
    values: Iterable[Any] = data
    for _ in range(depth - 1):
        values = itertools.chain.from_iterable(values)
    return bool in map(type, values)


def _flat(data: Any) -> Iterator[Any]:
    for value in data:
        if isinstance(value, list):
            yield from _flat(value)
        else:
            yield value


def from_array(name: str, array: np.ndarray, *, binary: bool) -> Tensor:
    """A wire tensor for an array: raw little-endian bytes when `binary`, else a flat list.
    BYTES values stay bytes in msgpack, which carries them; JSON has text only."""
    datatype = datatype_of(array.dtype)
    if datatype == "BYTES":
        values = [_plain(v) for v in array.ravel().tolist()]
        if not all(type(v) is str or type(v) is bytes for v in values):
            kinds = sorted({type(v).__name__ for v in values} - {"str", "bytes"})
            raise TensorError(f"output {name!r}: BYTES values must be strings, not {kinds}")
        data: list[Any] | bytes = values if binary else [_text(v) for v in values]
    elif binary:
        if datatype == "BOOL":  # a bool array viewed from other bytes may hold 2: send 1
            array = array != 0
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
    if datatype == "BOOL":  # as in from_array: bytes other than 0 and 1 sent as 1
        array = array != 0
    contiguous = np.ascontiguousarray(array, dtype=DATATYPES[datatype])
    raw = memoryview(contiguous.reshape(-1).view(np.uint8))  # also for zero-sized outputs
    return raw, raw.nbytes // array.shape[0] if array.shape[0] else 0


def _plain(value: object) -> object:
    """numpy's string scalars (an object array made from a string array holds them) as the
    str and bytes they are, which the encoders take."""
    if type(value) is str or type(value) is bytes:
        return value
    if isinstance(value, str):
        return str(value)
    return bytes(value) if isinstance(value, bytes) else value


def _text(value: object) -> object:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
