"""A real transformer end to end: all-MiniLM-L6-v2 exported with its pooling head (to ONNX,
as a `torch.export` archive in fp32 and bf16, and traced to TorchScript), token ids of
different lengths padded per batch by the worker, embeddings equal to those
sentence-transformers computes."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import numpy as np
import pytest

from bench.e2e import padded_batches
from surge.config import ModelConfig, Settings, convert, read_toml
from surge.minilm import MINILM_DIM, Tokenizer, model_dir, write_minilm
from surge.producers import PredictionError, SurgeClient
from surge.schemas import ErrorCode
from surge.workers import Worker, runtimes
from surge.workers.runtimes.devices import resolve_device
from tests.conftest import make_settings

pytestmark = pytest.mark.integration

SENTENCES = [
    "Surge serves models from Kafka.",
    "Hello world",
    "Batching is why it exists: many requests share one model call, padded to the longest.",
    "Short",
    "Exactly-once results commit with their offsets.",
    "A somewhat longer sentence, to give the batch rows of quite different lengths indeed.",
]


# (artifact, precision): how close the embeddings come to sentence-transformers' fp32 ones.
EXPORTS = {
    ("model.onnx", "fp32"): 2e-5,
    ("model.pt2", "fp32"): 2e-5,
    ("model.pt2", "bf16"): 2e-2,
    ("model.pt", "fp32"): 2e-5,
}


@pytest.fixture(scope="module", params=list(EXPORTS), ids="-".join)
def export(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, float]:
    artifact, precision = request.param
    root = tmp_path_factory.mktemp("minilm")
    write_minilm(root, artifact=artifact, precision=precision)
    return root, EXPORTS[request.param]


@pytest.fixture(scope="module")
def expected() -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_dir()), device="cpu").encode(SENTENCES)


async def test_embeddings_served_match_sentence_transformers(
    kafka: str,
    export: tuple[Path, float],
    expected: np.ndarray,
    run_worker: Callable[[Settings], Worker],
) -> None:
    minilm_root, tolerance = export
    worker = await run_worker(make_settings(kafka, minilm_root, None))
    tokenize = Tokenizer()
    requests = [tokenize(text) for text in SENTENCES]
    assert len({r["input_ids"].shape[1] for r in requests}) > 3  # lengths really differ
    async with SurgeClient(kafka, topic_prefix=worker.settings.worker.topic_prefix) as client:
        results = await client.predict_many("minilm", requests, timeout=60)
        # An id past the vocabulary is refused on its own (on a GPU it would fail in a kernel).
        unknown = tokenize(SENTENCES[0])
        unknown["input_ids"][0, 1] = 40_000
        with pytest.raises(PredictionError, match="outside the model's range") as refused:
            await client.predict("minilm", unknown, timeout=60)
        assert refused.value.code == ErrorCode.INVALID_INPUT
    embeddings = np.concatenate([r.outputs["embedding"] for r in results])
    assert embeddings.shape == (len(SENTENCES), MINILM_DIM)
    np.testing.assert_allclose(embeddings, expected, atol=tolerance)


@pytest.mark.parametrize(
    ("artifact", "precision", "error"),
    [
        ("model.bin", "fp32", "model.onnx, model.pt2 or model.pt"),
        ("model.pt2", "fp8", "fp32, fp16, bf16"),
        ("model.onnx", "fp16", "ONNX export is fp32"),
    ],
)
def test_an_export_asked_for_the_impossible_says_what_is_possible(
    tmp_path: Path, artifact: str, precision: str, error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        write_minilm(tmp_path, artifact=artifact, precision=precision)
    assert not any(tmp_path.iterdir())  # nothing half-written


@pytest.mark.skipif(resolve_device("auto") == "cpu", reason="needs a GPU")
@pytest.mark.parametrize("artifact", ["model.pt2", "model.pt"])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_transformer_on_a_gpu_matches_the_cpu(
    tmp_path: Path, artifact: str, precision: str
) -> None:
    """An exported graph moved whole to the GPU, or a graph traced there, in reduced
    precision, on rows padded to different lengths, from several threads at once (as
    instances call it)."""
    tokenize = Tokenizer()
    rows = [tokenize(text) for text in SENTENCES]
    [batch] = padded_batches(rows, len(rows))
    cpu = runtimes.load(*_served(write_minilm(tmp_path / "cpu", artifact="model.pt"), "cpu"))
    traced_on = "cuda" if artifact == "model.pt" else "cpu"
    gpu_path = write_minilm(
        tmp_path / "gpu", artifact=artifact, precision=precision, device=traced_on
    )
    gpu = runtimes.load(*_served(gpu_path, "cuda"))
    assert gpu.device == "cuda:0"
    expected = cpu.run(batch)["embedding"]
    with ThreadPoolExecutor(4) as pool:
        for got in pool.map(lambda _: gpu.run(batch)["embedding"], range(16)):
            np.testing.assert_allclose(got, expected, atol=2e-2)


def _served(path: Path, device: str) -> tuple[Path, ModelConfig]:
    """The export and its config.toml, on `device`."""
    config = convert(read_toml(path.parent.parent / "config.toml"), ModelConfig, "minilm")
    return path, msgspec.structs.replace(config, device=device)
