"""Test models built in code: TorchScript models that refuse some inputs, and others."""

from __future__ import annotations

from pathlib import Path

import torch

CONFIG = """\
max_batch_size = {batch}
max_batch_delay_ms = {delay}
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


class Cramped(torch.nn.Module):
    """Adds one; runs out of memory on batches of more than 4 rows, as a small GPU would."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 4:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return x + 1


def _write(
    model_root: Path, name: str, module: torch.nn.Module, delay_ms: int, batch: int = 64
) -> Path:
    version_dir = model_root / name / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    (model_root / name / "config.toml").write_text(CONFIG.format(delay=delay_ms, batch=batch))
    path = version_dir / "model.pt"
    torch.jit.script(module).save(str(path))
    return path


def write_picky(model_root: Path) -> Path:
    return _write(model_root, "picky", Picky(), delay_ms=30)


def write_cramped(model_root: Path) -> Path:
    return _write(model_root, "cramped", Cramped(), delay_ms=50)


class Busy(torch.nn.Module):
    """Returns its input after a fixed amount of CPU work per call, whatever the batch size."""

    def __init__(self, iterations: int) -> None:
        super().__init__()
        self.iterations = iterations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.ones(256, 256) / 256
        acc = torch.ones(64, 256)
        for _ in range(self.iterations):
            acc = torch.tanh(acc @ w)
        return x + acc.sum() * 0


def write_slow(model_root: Path) -> Path:
    """One to two seconds of CPU per call."""
    return _write(model_root, "slow", Busy(20000), delay_ms=5)


def write_steady(model_root: Path) -> Path:
    """Tens of milliseconds of CPU per call, batches of up to 4 rows."""
    return _write(model_root, "steady", Busy(300), delay_ms=1, batch=4)


class Hangs(torch.nn.Module):
    """Answers at once, but a row whose first value is 13 takes it hours of CPU: hung."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x[:, 0] == 13).any()):
            w = torch.ones(256, 256) / 256
            acc = torch.ones(64, 256)
            for _ in range(100_000_000):
                acc = torch.tanh(acc @ w)
            return x + acc.sum() * 0
        return x


def write_hangs(model_root: Path) -> Path:
    return _write(model_root, "hangs", Hangs(), delay_ms=1)


class Wide(torch.nn.Module):
    """Each row of 4 values repeated to 16,384: 64 KiB of output per row."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(1, 4096)


def write_wide(model_root: Path) -> Path:
    path = _write(model_root, "wide", Wide(), delay_ms=1, batch=8)
    config = model_root / "wide" / "config.toml"
    inputs, outputs = config.read_text().split("[[outputs]]")
    config.write_text(inputs + "[[outputs]]" + outputs.replace("[4]", "[16384]"))
    return path


def write_echo_text(model_root: Path) -> Path:
    """An ONNX graph that returns its string input: text in, the same text out."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["echo"])],
        "echo",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch", 1])],
        [helper.make_tensor_value_info("echo", TensorProto.STRING, ["batch", 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    version = model_root / "echo" / "1"
    version.mkdir(parents=True)
    onnx.save(model, version / "model.onnx")
    return version


def write_unpadded_conv(model_root: Path) -> Path:
    """An ONNX 3×3 convolution without padding over images of any height and width, averaged
    to one value per channel: it runs on images of 3×3 and more, not on a pixel."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["features"]),
            helper.make_node("ReduceMean", ["features"], ["y"], axes=[2, 3], keepdims=0),
        ],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    version = model_root / "conv" / "1"
    version.mkdir(parents=True)
    onnx.save(model, version / "model.onnx")
    return version
