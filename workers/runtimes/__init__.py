"""Model runtimes behind one contract: `load(path, config) -> Runtime`, `run`, `close`."""

from __future__ import annotations

from pathlib import Path

from surge.config import ModelConfig
from surge.workers.runtimes.base import (
    DeviceFailed,
    NotBatchFirst,
    OutputsUnlikeDeclared,
    Runtime,
    TensorSpec,
    varies,
    warm_up,
)

# The file a version directory must hold, and the runtime that reads it, in order of preference.
ARTIFACTS = {"model.onnx": "onnx", "model.pt2": "torch", "model.pt": "torch"}


def find_artifact(version_dir: Path, runtime: str = "auto") -> Path | None:
    """The version's model file: of the kind `runtime` reads, or any (in order of preference)."""
    for name, kind in ARTIFACTS.items():
        candidate = version_dir / name
        if runtime in ("auto", kind) and candidate.is_file():
            return candidate
    return None


def load(path: Path, config: ModelConfig) -> Runtime:
    """Open a model file with the runtime its name (or `config.runtime`) calls for."""
    kind = ARTIFACTS[path.name] if config.runtime == "auto" else config.runtime
    if kind == "onnx":
        from surge.workers.runtimes.onnx_runtime import OnnxRuntime

        return OnnxRuntime(path, config)
    from surge.workers.runtimes.torch_runtime import (
        TorchRuntime,  # torch is imported only when used
    )

    return TorchRuntime(path, config)


__all__ = [
    "ARTIFACTS",
    "DeviceFailed",
    "NotBatchFirst",
    "OutputsUnlikeDeclared",
    "Runtime",
    "TensorSpec",
    "find_artifact",
    "load",
    "varies",
    "warm_up",
]
