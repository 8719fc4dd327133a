"""ONNX Runtime: the CUDA execution provider on a GPU, the CPU provider otherwise."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from surge.config import ModelConfig
from surge.workers.runtimes.base import TensorSpec
from surge.workers.runtimes.devices import resolve_device

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
        if config.intra_op_threads:
            options.intra_op_num_threads = config.intra_op_threads
        self.device = resolve_device(config.device)
        providers: list[str | tuple[str, dict[str, str]]] = ["CPUExecutionProvider"]
        if self.device.startswith("cuda"):
            device_id = self.device.partition(":")[2] or "0"
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        self._session = ort.InferenceSession(str(path), options, providers=providers)
        if "CUDAExecutionProvider" not in self._session.get_providers():
            self.device = "cpu"
        self.inputs = _specs(config.inputs, self._session.get_inputs())
        self.outputs = _specs(config.outputs, self._session.get_outputs())
        self._output_names = [spec.name for spec in self.outputs]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self._session.run(self._output_names, dict(inputs))
        return dict(zip(self._output_names, results, strict=True))

    def close(self) -> None:
        del self._session


def _specs(configured: list, declared: list[ort.NodeArg]) -> tuple[TensorSpec, ...]:
    """Specs from config.toml when given (for padding values), else from the model's graph."""
    if configured:
        return tuple(TensorSpec.from_config(c) for c in configured)
    specs = []
    for arg in declared:
        datatype = _DATATYPES.get(arg.type)
        if datatype is None:
            raise ValueError(f"tensor {arg.name!r} has unsupported type {arg.type}")
        dims = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape[1:])
        specs.append(TensorSpec(arg.name, datatype, dims))
    return tuple(specs)
