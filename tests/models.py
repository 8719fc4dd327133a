"""Test models built in code: a TorchScript model that refuses some inputs."""

from __future__ import annotations

from pathlib import Path

import torch

PICKY_CONFIG = """\
max_batch_size = 64
max_batch_delay_ms = 30
[[inputs]]
name = "x"
datatype = "FP32"
shape = [4]
[[outputs]]
name = "y"
datatype = "FP32"
shape = [4]
"""


class Picky(torch.nn.Module):
    """Doubles its input; raises on any negative value, failing the whole batch it is in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x < 0).any()):
            raise ValueError("negative input")
        return x * 2


def write_picky(model_root: Path, version: int = 1) -> Path:
    version_dir = model_root / "picky" / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    (model_root / "picky" / "config.toml").write_text(PICKY_CONFIG)
    path = version_dir / "model.pt"
    torch.jit.script(Picky()).save(str(path))
    return path


OOM_CONFIG = """\
max_batch_size = 64
max_batch_delay_ms = 50
[[inputs]]
name = "x"
datatype = "FP32"
shape = [4]
[[outputs]]
name = "y"
datatype = "FP32"
shape = [4]
"""


class Cramped(torch.nn.Module):
    """Runs out of memory on batches of more than 4 rows, as a small GPU would."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 4:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return x + 1


def write_cramped(model_root: Path, version: int = 1) -> Path:
    version_dir = model_root / "cramped" / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    (model_root / "cramped" / "config.toml").write_text(OOM_CONFIG)
    path = version_dir / "model.pt"
    torch.jit.script(Cramped()).save(str(path))
    return path
