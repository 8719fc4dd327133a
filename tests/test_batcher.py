"""The batcher's choices, on plain objects: which requests share a model call."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from surge.config import ModelConfig
from surge.workers.batcher import Batcher
from surge.workers.intake import Job
from surge.workers.runtimes import TensorSpec
from tests.helpers import make_ticket


class _Embedder:
    """Records every batch it runs, padded as the batcher padded it."""

    inputs = (TensorSpec("ids", "INT64", (-1,), pad_value=0),)
    outputs = (TensorSpec("embedding", "FP32", (2,)),)

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["ids"]
        self.batches.append(ids)
        return {"embedding": np.zeros((ids.shape[0], 2), np.float32)}


class _Answers:
    def __init__(self) -> None:
        self.answered: list[Any] = []
        self.failed: list[Any] = []

    def ok(self, ticket: Any, response: Any) -> None:
        self.answered.append(ticket)

    def error(self, ticket: Any, rejection: Any) -> None:
        self.failed.append(rejection)


def _batcher(model: _Embedder, answers: _Answers) -> Batcher:
    return Batcher(
        model="embedder",
        version="1",
        runtime=model,  # type: ignore[arg-type]
        config=ModelConfig(max_batch_size=8, max_batch_delay_ms=1),
        executor=ThreadPoolExecutor(1),
        replies=answers,  # type: ignore[arg-type]
        time_budget_s=10,
    )


def _queue(batcher: Batcher, lengths: list[int]) -> None:
    """One single-row request per length, ids numbered from 1 in arrival order."""
    for i, length in enumerate(lengths):
        batcher.put(Job(make_ticket(b"{}"), {"ids": np.full((1, length), i + 1)}, 1, None))


async def test_a_backlog_of_padded_inputs_is_batched_by_length() -> None:
    model, answers = _Embedder(), _Answers()
    batcher = _batcher(model, answers)
    lengths = [3, 30] * 32  # a backlog alternating short and long rows
    _queue(batcher, lengths)
    crashes: list[BaseException] = []
    batcher.start(on_crash=crashes.append)
    async with asyncio.timeout(30):
        while len(answers.answered) + len(answers.failed) < len(lengths) and not crashes:
            await asyncio.sleep(0.01)
    await batcher.close()
    assert not crashes
    assert not answers.failed

    assert model.batches[0][0, 0] == 1  # the oldest request still goes first
    padded = sum(batch.size for batch in model.batches)
    assert padded < 1.2 * sum(lengths)  # first come, first served would pad to 30 every time


async def test_an_odd_length_request_is_not_starved_by_bucketing() -> None:
    model, answers = _Embedder(), _Answers()
    batcher = _batcher(model, answers)
    lengths = [3] * 5 + [30] + [3] * 200  # one long request amid a stream of short ones
    _queue(batcher, lengths)
    batches = []
    while batcher.queued:
        batches.append(batcher._take(8))
    long_batch = next(
        i for i, jobs in enumerate(batches) if any(job.inputs["ids"].shape[1] == 30 for job in jobs)
    )
    assert long_batch <= 1  # served within a batch of when first come, first served would
