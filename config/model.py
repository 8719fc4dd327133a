"""Per-model configuration: `MODEL_ROOT/<name>/config.toml`, shared by all its versions."""

from __future__ import annotations

import math
import re
from typing import Annotated, Literal

import msgspec

Positive = Annotated[int, msgspec.Meta(ge=1)]
Dim = Annotated[int, msgspec.Meta(ge=-1)]


class TensorConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One model input or output. `shape` excludes the batch dimension; -1 is variable.

    An input with `pad_value` is padded to the longest request of its batch along its
    variable dimensions; without one, requests of different shapes run in separate batches.
    """

    name: str
    datatype: str
    shape: list[Dim]
    pad_value: float | None = None
    # [low, high]: the values an input may hold (token ids below the vocabulary size, say),
    # checked per request. Out of range, a GPU kernel fails the whole process's CUDA context
    # (PyTorch) or reads zeros instead (ONNX Runtime); here the one request is refused.
    # Whole numbers stay exact (a float has no 2**63 - 1, INT64's highest).
    value_range: tuple[int | float, int | float] | None = None
    # The padded input whose variable dimensions this tensor's leading ones follow. An output
    # (per-token scores, say) is cut back to each request's own length; an input (an
    # attention mask) must have that input's length in every request.
    follows: str | None = None
    # The largest size of each variable dimension (-1: any), as `shape` lists them: a
    # transformer's positions, say. A longer request is refused alone; in a padded batch it
    # would fail every request it shares the batch with.
    max_shape: list[Dim] | None = None

    def __post_init__(self) -> None:
        if self.value_range is not None:
            self._check_range(*self.value_range)
        if self.max_shape is not None:
            self._check_max_shape(self.max_shape)
        if self.pad_value is not None and not _holds(self.datatype, self.pad_value):
            # numpy would pad with another value: -1 as UINT8 is 255, 0.5 as INT32 is 0.
            raise ValueError(
                f"tensor {self.name!r}: pad_value {self.pad_value:g} is not a {self.datatype} value"
            )

    def _check_max_shape(self, max_shape: list[int]) -> None:
        if len(max_shape) != len(self.shape):
            raise ValueError(
                f"tensor {self.name!r}: max_shape {max_shape} has not the {len(self.shape)} "
                f"dimensions of shape {self.shape}"
            )
        for size, largest in zip(self.shape, max_shape, strict=True):
            if largest != -1 and (size != -1 or largest == 0):
                raise ValueError(
                    f"tensor {self.name!r}: max_shape {max_shape} bounds only shape "
                    f"{self.shape}'s variable (-1) dimensions, each at 1 or more (-1: any)"
                )

    def _check_range(self, low: float, high: float) -> None:
        if self.datatype == "BYTES":
            raise ValueError(f"tensor {self.name!r}: a BYTES tensor has no value_range")
        if math.isnan(low) or math.isnan(high):
            raise ValueError(f"tensor {self.name!r}: value_range bounds must be numbers")
        if not low <= high:
            raise ValueError(f"tensor {self.name!r}: value_range {[low, high]} is empty")
        limits = _integer_limits(self.datatype)
        if limits is not None and not limits[0] <= low <= high <= limits[1]:  # inf too
            raise ValueError(
                f"tensor {self.name!r}: value_range {[low, high]} is not within "
                f"{self.datatype}'s {list(limits)}"
            )
        if self.pad_value is not None and not low <= self.pad_value <= high:
            # Padding goes into the model as any value does.
            raise ValueError(
                f"tensor {self.name!r}: pad_value {self.pad_value:g} is outside its "
                f"value_range {[low, high]}"
            )


def _integer_limits(datatype: str) -> tuple[int, int] | None:
    """The lowest and highest value of an integer datatype (BOOL's 0 and 1), else None."""
    if datatype == "BOOL":
        return 0, 1
    if integer := re.fullmatch(r"(U?)INT(8|16|32|64)", datatype):
        bits, unsigned = int(integer[2]), bool(integer[1])
        return (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return None


def _holds(datatype: str, value: float) -> bool:
    """Whether a number is exactly a value of a datatype."""
    if datatype == "BOOL":
        return value in (0, 1)
    if datatype == "BYTES":
        return False
    if limits := _integer_limits(datatype):
        return value.is_integer() and limits[0] <= value <= limits[1]
    if datatype == "FP16":
        return not abs(value) > 65504  # larger is inf (NaN passes: it pads as NaN)
    return True


class ModelConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    runtime: Literal["auto", "onnx", "torch"] = "auto"  # auto: from the model file's name
    device: str = "auto"  # auto | cpu | cuda | cuda:<n>
    # PyTorch models: weights and floating-point inputs in this type; outputs come back as
    # declared. ONNX models carry their precision in the file.
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    max_batch_size: Positive = 64
    max_batch_delay_ms: Annotated[float, msgspec.Meta(ge=0, le=60_000)] = 2.0
    preferred_batch_sizes: list[Positive] = []
    instances: Positive = 1  # batches of this model run concurrently
    # With a backlog of padded inputs, how many batches' worth of the queue length bucketing
    # may reorder (the oldest request always goes first): more pads less, later requests of
    # a fitting length overtake more. 1: arrival order.
    bucket_window: Annotated[int, msgspec.Meta(ge=1, le=64)] = 16
    # A model whose recent batches all ran faster than this runs on the event loop itself:
    # handing a sub-millisecond call to a thread costs more than the call. 0: always a thread.
    inline_below_ms: Annotated[float, msgspec.Meta(ge=0, le=10)] = 1.0
    # 0: the runtime's default for one instance; with several, the CPUs split between them.
    # PyTorch has one setting per process: the last model loaded that sets one decides.
    intra_op_threads: Annotated[int, msgspec.Meta(ge=0)] = 0
    version_policy: Literal["latest", "all", "specific"] = "latest"
    latest_versions: Positive = 1
    versions: list[Annotated[int, msgspec.Meta(ge=0)]] = []
    inputs: list[TensorConfig] = []  # empty: read from the ONNX model
    outputs: list[TensorConfig] = []
    warmup: bool = True

    def __post_init__(self) -> None:
        if ranged := [o.name for o in self.outputs if o.value_range is not None]:
            raise ValueError(f"outputs {ranged}: value_range applies to inputs")
        if bounded := [o.name for o in self.outputs if o.max_shape is not None]:
            raise ValueError(f"outputs {bounded}: max_shape applies to inputs")
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", self.device):
            raise ValueError(f"device {self.device!r} must be auto, cpu, cuda or cuda:<n>")
        if self.version_policy == "specific" and not self.versions:
            raise ValueError("version_policy 'specific' needs a list of versions")
        # Each read by one policy only: set under another, it would be ignored unnoticed.
        if self.versions and self.version_policy != "specific":
            raise ValueError(
                f"versions {self.versions} apply to version_policy 'specific', not "
                f"{self.version_policy!r}"
            )
        if self.latest_versions != 1 and self.version_policy != "latest":
            raise ValueError(
                f"latest_versions applies to version_policy 'latest', not {self.version_policy!r}"
            )
        too_big = [n for n in self.preferred_batch_sizes if n > self.max_batch_size]
        if too_big:
            raise ValueError(f"preferred_batch_sizes {too_big} exceed max_batch_size")
        for kind, tensors in (("input", self.inputs), ("output", self.outputs)):
            names = [tensor.name for tensor in tensors]
            if twice := sorted({name for name in names if names.count(name) > 1}):
                raise ValueError(f"{kind}s {twice} are declared more than once")
            for tensor in tensors:
                if tensor.follows is not None:
                    self._check_follows(kind, tensor)

    def _check_follows(self, kind: str, tensor: TensorConfig) -> None:
        padded = {i.name: i for i in self.inputs if i.pad_value is not None and i is not tensor}
        source = padded.get(tensor.follows or "")
        if source is None:
            raise ValueError(
                f"{kind} {tensor.name!r}: follows {tensor.follows!r}, which is not another "
                f"input with a pad_value (declared: {sorted(padded)})"
            )
        if source.follows is not None:
            raise ValueError(f"{kind} {tensor.name!r}: follows {source.name!r}, which follows too")
        if kind == "input" and tensor.pad_value is None:
            raise ValueError(f"input {tensor.name!r}: follows a padded input, so needs a pad_value")
        leading = tensor.shape[: len(source.shape)]
        if len(leading) < len(source.shape) or any(
            want == -1 and got != -1 for want, got in zip(source.shape, leading, strict=True)
        ):
            raise ValueError(
                f"{kind} {tensor.name!r}: shape {tensor.shape} does not start with the "
                f"variable dimensions of {source.name!r} {source.shape}"
            )
