"""The example model the demo, tests and benchmarks serve, built in code (no downloads)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MLP_NAME = "mlp"
MLP_FEATURES = 32
MLP_CLASSES = 10

MLP_CONFIG = """\
# A 32 -> 256 -> 256 -> 10 softmax classifier.
max_batch_size = 256
max_batch_delay_ms = 2.0
intra_op_threads = 1
"""


def mlp_model(seed: int = 0) -> onnx.ModelProto:
    """A float32 32 -> 256 -> 256 -> 10 softmax MLP with a dynamic batch dimension."""
    rng = np.random.default_rng(seed)
    sizes = [MLP_FEATURES, 256, 256, MLP_CLASSES]
    weights, nodes = [], []
    current = "x"
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        w = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        b = (rng.standard_normal(fan_out) * 0.01).astype(np.float32)
        weights += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        out = f"h{i}"
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [out]))
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"]))
            out = f"r{i}"
        current = out
    nodes.append(helper.make_node("Softmax", [current], ["probs"], axis=1))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", MLP_FEATURES])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", MLP_CLASSES])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_mlp(
    model_root: Path, version: int = 1, *, seed: int = 0, config: str = MLP_CONFIG
) -> Path:
    """Write `model_root/mlp/<version>/model.onnx` (and config.toml); returns the model file."""
    model_dir = model_root / MLP_NAME
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.toml").write_text(config)
    path = version_dir / "model.onnx"
    onnx.save(mlp_model(seed), str(path))
    return path
