"""The one contract every model runtime implements, and what the batcher knows of a model."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from surge.config import ModelConfig, TensorConfig
from surge.schemas import DATATYPES


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A model input or output. `shape` excludes the batch dimension; -1 is variable."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    pad_value: float | None = None
    value_range: tuple[int | float, int | float] | None = None  # inputs: values a request may hold
    follows: str | None = None  # outputs: cut back per request to this padded input's length
    text: bool = False  # BYTES the model reads as UTF-8 strings (ONNX string tensors)
    max_shape: tuple[int, ...] | None = None  # inputs: the largest sizes, -1 for any
    # Elements and bytes per row of a fixed-shape numeric tensor (0 otherwise): such rows
    # travel as raw bytes from the request to the batch, joined once per batch.
    row_elements: int = field(init=False, compare=False)
    row_bytes: int = field(init=False, compare=False)

    def __post_init__(self) -> None:
        fixed = self.datatype != "BYTES" and all(d >= 0 for d in self.shape)
        elements = math.prod(self.shape) if fixed else 0
        object.__setattr__(self, "row_elements", elements)
        object.__setattr__(self, "row_bytes", elements * self.dtype.itemsize)

    @property
    def dtype(self) -> np.dtype[Any]:
        return DATATYPES[self.datatype]

    def fits(self, dims: Sequence[int]) -> bool:
        """Whether a row of these dimensions is one of this tensor's (-1: any size)."""
        return len(dims) == len(self.shape) and all(
            want in (-1, got) for want, got in zip(self.shape, dims, strict=True)
        )

    @classmethod
    def from_config(cls, config: TensorConfig) -> TensorSpec:
        if config.datatype not in DATATYPES:
            raise ValueError(f"tensor {config.name!r}: unknown datatype {config.datatype!r}")
        return cls(
            config.name,
            config.datatype,
            tuple(config.shape),
            config.pad_value,
            config.value_range,
            config.follows,
            max_shape=None if config.max_shape is None else tuple(config.max_shape),
        )


class DeviceFailed(RuntimeError):
    """The accelerator failed in a way every later call shares: the process's CUDA context
    is unusable until it restarts."""


# CUDA's sticky errors, by message and by name: after one of these every call on the
# context fails. Others (an invalid launch configuration for one shape, a cuBLAS status)
# fail one call, and the batcher isolates their request as for any model error.
_STICKY_CUDA_ERRORS = (
    "device-side assert",
    "illegal memory access",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "hardware stack error",
    "invalid program counter",
    "launch timed out",
    "uncorrectable ecc",
    "cudaerrorassert",
    "cudaerrorillegaladdress",
    "cudaerrorlaunchfailure",
    "cudaerrormisalignedaddress",
    "cudaerrorillegalinstruction",
    "cudaerrorhardwarestackerror",
    "cudaerrorinvalidpc",
    "cudaerrorlaunchtimeout",
    "cudaerroreccuncorrectable",
)


def is_cuda_failure(exc: BaseException) -> bool:
    """Whether an error a runtime raised left the CUDA context unusable."""
    text = str(exc).lower()
    return any(marker in text for marker in _STICKY_CUDA_ERRORS)


class Runtime(Protocol):
    """A loaded model. `run` is called from an executor thread, one batch at a time per instance."""

    kind: str
    device: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class NotBatchFirst(ValueError):
    """A model whose outputs do not have a row per batch row first (time-major, say): its
    rows could not be told apart by request, at any batch size."""


class OutputsUnlikeDeclared(ValueError):
    """A model whose outputs are not what its config declares: served, they would go out
    under the wrong name or type (outputs declared in another order, say)."""


def warm_up(runtime: Runtime, batch_sizes: Sequence[int], length: int = 1) -> None:
    """Run zero-filled batches so first requests don't pay for lazy allocation and kernel
    choice, every variable dimension `length` long (or as long as its max_shape allows);
    raises NotBatchFirst for a model whose outputs are not batch-first, and
    OutputsUnlikeDeclared for one whose outputs' types or fixed dimensions are not those
    declared."""
    for rows in batch_sizes:
        inputs = {}
        for spec in runtime.inputs:
            if spec.datatype == "BYTES":
                return  # no meaningful zero value: skip warm-up rather than guess
            dims = tuple(
                _warm_length(spec, i, length) if d < 0 else d for i, d in enumerate(spec.shape)
            )
            inputs[spec.name] = np.full((rows, *dims), _accepted(spec), dtype=spec.dtype)
        outputs = runtime.run(inputs)
        for spec in runtime.outputs:
            _check_output(spec, outputs[spec.name], rows)


def _warm_length(spec: TensorSpec, dim: int, length: int) -> int:
    largest = -1 if spec.max_shape is None else spec.max_shape[dim]
    return length if largest < 0 else max(1, min(length, largest))


def varies(runtime: Runtime) -> bool:
    """Whether any input has a variable dimension besides the batch's."""
    return any(d < 0 for spec in runtime.inputs for d in spec.shape)


def _check_output(spec: TensorSpec, output: np.ndarray, rows: int) -> None:
    if not output.shape or output.shape[0] != rows:
        raise NotBatchFirst(
            f"output {spec.name!r} has shape {list(output.shape)} for a batch of {rows}: "
            "outputs have the batch dimension first"
        )
    if not spec.fits(output.shape[1:]) or output.dtype != spec.dtype:
        raise OutputsUnlikeDeclared(
            f"output {spec.name!r} is {output.dtype} of shape {list(output.shape)} for a batch "
            f"of {rows}, declared {spec.datatype} of shape {batch_shape(spec.shape)}"
        )


def batch_shape(dims: Sequence[int]) -> list[int | str]:
    """A tensor's dimensions as messages show them: the batch first, -1 as "any"."""
    return ["batch", *(d if d >= 0 else "any" for d in dims)]


def _accepted(spec: TensorSpec) -> float:
    """A value the model accepts for an input: 0, or the lowest of its value_range."""
    if spec.value_range is None:
        return 0
    low = spec.value_range[0]
    return math.ceil(low) if spec.dtype.kind in "biu" else low


def intra_op_threads(config: ModelConfig, *, shared_pool: bool) -> int:
    """Intra-op threads to configure: as set; 0 (auto) leaves one instance the runtime's
    default, and splits this process's CPUs (those it may run on) between several. Each of an
    op's threads waits for the slowest: instances that each want every core stall one another
    at every op, where a share each runs them side by side. A `shared_pool` (ONNX Runtime's,
    one per session) has the threads configured less one, and every calling thread joins in;
    otherwise (PyTorch's OpenMP) each call gets a team of the configured size."""
    if config.intra_op_threads or config.instances == 1:
        return config.intra_op_threads
    cpus = len(os.sched_getaffinity(0))
    if shared_pool:
        return max(1, cpus - config.instances + 1)
    return max(1, cpus // config.instances)
