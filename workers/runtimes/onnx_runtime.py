"""ONNX Runtime: the CUDA execution provider on a GPU, the CPU provider otherwise.

On a GPU, batches go through I/O binding: inputs are copied into page-locked (pinned) host
buffers, from which the device reads them by DMA, and outputs are allocated on the device by
ONNX Runtime and copied back once, instead of staged through pageable memory at every run.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import structlog

from surge.config import ModelConfig
from surge.workers.runtimes.base import DeviceFailed, TensorSpec, intra_op_threads, is_cuda_failure
from surge.workers.runtimes.devices import resolve_device

log = structlog.get_logger("surge.runtimes")
_DATATYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


class OnnxRuntime:
    kind = "onnx"

    def __init__(self, path: Path, config: ModelConfig) -> None:
        if config.precision != "fp32":
            raise ValueError(
                f"precision {config.precision!r} applies to PyTorch models: an ONNX model's "
                "precision is in the file (export it in fp16 instead)"
            )
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # 0: the runtime's default. One pool serves every instance's calls.
        options.intra_op_num_threads = intra_op_threads(config, shared_pool=True)
        # Idle pool threads sleep instead of spinning: a worker shares its cores with the
        # event loop (and often a sidecar), which spinning threads would starve.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.device = resolve_device(config.device)
        device_id = int(self.device.partition(":")[2] or 0)
        providers: list[str | tuple[str, dict[str, str]]] = ["CPUExecutionProvider"]
        if self.device.startswith("cuda"):
            load_cuda_libraries()
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": str(device_id)}))
        self._session = ort.InferenceSession(str(path), options, providers=providers)
        _check_batch_dimension(self._session.get_inputs(), config.max_batch_size)
        self._binding: IoBinding | None = None
        if "CUDAExecutionProvider" not in self._session.get_providers():
            if self.device != "cpu":
                log.warning(
                    "cuda_provider_unavailable",
                    model=str(path),
                    available=ort.get_available_providers(),
                    hint="install onnxruntime-gpu built for this CUDA; serving on the CPU",
                )
            self.device = "cpu"
        elif not any(
            arg.type == "tensor(string)"
            for arg in [*self._session.get_inputs(), *self._session.get_outputs()]
        ):  # strings have no device memory to bind: those models run as on the CPU
            self._binding = IoBinding(self._session, "cuda", device_id, pinned=True)
        self.inputs = _specs(config.inputs, self._session.get_inputs(), "inputs")
        self.outputs = _specs(config.outputs, self._session.get_outputs(), "outputs")
        self._output_names = [spec.name for spec in self.outputs]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            if self._binding is not None:
                return self._binding.run(inputs, self._output_names)
            results = self._session.run(self._output_names, dict(inputs))
        except Exception as exc:  # onnxruntime's own types: Fail, RuntimeException, …
            if self.device != "cpu" and is_cuda_failure(exc):
                raise DeviceFailed(f"{self.device}: {exc}") from exc
            raise
        return dict(zip(self._output_names, results, strict=True))

    def close(self) -> None:
        self._binding = None  # it holds the session too: its weights and device memory
        del self._session


@functools.cache
def load_cuda_libraries() -> None:
    """onnxruntime-gpu finds CUDA and cuDNN by the loader's search path alone. Where they came
    as the `nvidia-*` wheels (with PyTorch's CUDA build, say), nothing points there: load them
    from the wheels installed beside onnxruntime, else from that path, once per process."""
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime >= 1.21
    if preload is not None:
        preload()


class IoBinding:
    """Runs a session with inputs staged in host buffers (page-locked when `pinned`) and
    outputs allocated on `device_type`. Staging buffers grow to the largest batch seen and are
    reused; each thread has its own, as model instances run concurrently. A run ends with the
    device synchronised, so a buffer is free again when `run` returns."""

    def __init__(
        self, session: ort.InferenceSession, device_type: str, device_id: int, *, pinned: bool
    ) -> None:
        self._session = session
        self._device_type = device_type
        self._device_id = device_id
        self._pinned = pinned
        self._local = threading.local()

    def run(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]
    ) -> dict[str, np.ndarray]:
        binding = self._session.io_binding()
        for name, array in inputs.items():
            array = np.ascontiguousarray(array)
            pointer = self._stage(name, array)
            binding.bind_input(name, "cpu", 0, array.dtype, list(array.shape), pointer)
        for name in output_names:
            binding.bind_output(name, self._device_type, self._device_id)
        self._session.run_with_iobinding(binding)
        return dict(zip(output_names, binding.copy_outputs_to_cpu(), strict=True))

    def _stage(self, name: str, array: np.ndarray) -> int:
        """Copy the array into this thread's staging buffer for the input; its address."""
        buffers: dict[str, tuple[object, int, int]] = self._local.__dict__.setdefault("buffers", {})
        staged = buffers.get(name)
        if staged is None or staged[2] < array.nbytes:
            capacity = max(array.nbytes, 1) * 2  # room for longer batches before growing again
            staged = buffers[name] = (
                *host_buffer(capacity, self._pinned, self._device_id),
                capacity,
            )
        pointer = staged[1]
        if array.nbytes:
            ctypes.memmove(pointer, array.ctypes.data, array.nbytes)
        return pointer


def host_buffer(nbytes: int, pinned: bool, device_id: int = 0) -> tuple[object, int]:
    """A host buffer (kept alive by the first item) and its address. Page-locked memory comes
    from PyTorch's allocator where it is installed with CUDA (ONNX Runtime's Python API cannot
    allocate it); without it, ordinary memory, which still works, through one more copy."""
    if pinned:
        try:
            import torch

            # On the model's GPU: torch would otherwise open a context (hundreds of MB) on GPU 0.
            with torch.cuda.device(device_id):
                buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            return buffer, buffer.data_ptr()
        except (ImportError, RuntimeError):
            pass
    array = np.empty(nbytes, np.uint8)
    return array, array.ctypes.data


def _check_batch_dimension(declared: list[ort.NodeArg], max_batch_size: int) -> None:
    """A graph exported with a fixed batch dimension runs batches of exactly that many rows;
    a batch of any other size would fail at every call."""
    fixed = {arg.shape[0] for arg in declared if arg.shape and isinstance(arg.shape[0], int)}
    if not fixed or (fixed == {1} and max_batch_size == 1):
        return
    size = min(fixed)
    raise ValueError(
        f"the model's batch dimension is fixed at {size}: export it with a dynamic batch "
        "dimension" + (" (or set max_batch_size = 1 in its config.toml)" if fixed == {1} else "")
    )


def _specs(configured: list, declared: list[ort.NodeArg], kind: str) -> tuple[TensorSpec, ...]:
    """Specs from config.toml when given (for padding values), else from the model's graph.
    String tensors take text: onnxruntime would pass a bytes value on as its repr."""
    strings = {arg.name for arg in declared if arg.type == "tensor(string)"}
    if configured:
        specs = [TensorSpec.from_config(c) for c in configured]
    else:
        specs = []
        for arg in declared:
            datatype = _DATATYPES.get(arg.type)
            if datatype is None:
                raise ValueError(f"tensor {arg.name!r} has unsupported type {arg.type}")
            if not arg.shape:  # a scalar, or (as onnxruntime shows it too) a rank unknown
                raise ValueError(
                    f"tensor {arg.name!r} has no dimensions in the graph: declare its shape "
                    f"under [[{kind}]] in the model's config.toml"
                )
            dims = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape[1:])
            specs.append(TensorSpec(arg.name, datatype, dims))
    return tuple(
        dataclasses.replace(spec, text=True) if spec.name in strings else spec for spec in specs
    )
