"""Shadow comparison through a real worker serving two versions: the candidate's copies on a
topic of their own, every pair of results compared."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from surge.config import Settings
from surge.examples import MLP_CONFIG, write_mlp
from surge.producers import SurgeClient
from surge.producers.shadow import compare_lines
from surge.workers import Worker
from tests.conftest import make_settings
from tests.helpers import create_topics
from tests.test_cli import surge

pytestmark = pytest.mark.integration


async def test_a_candidate_version_is_compared_with_the_live_one_request_by_request(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker], tmp_path: Path
) -> None:
    both = MLP_CONFIG + 'version_policy = "all"\n'
    write_mlp(model_root, 1, seed=0, config=both)
    write_mlp(model_root, 2, seed=3, config=both)  # other weights
    shadow = f"test.shadow.{uuid.uuid4().hex[:8]}"
    settings = make_settings(kafka, model_root, None, SURGE_WORKER__SHARED_TOPICS=f'["{shadow}"]')
    await create_topics(kafka, shadow)
    await run_worker(settings)
    rows = np.random.default_rng(0).standard_normal((300, 32)).astype(np.float32)
    lines = [json.dumps({"x": [row.tolist()]}) for row in rows] + ["{oops"]

    async with SurgeClient(kafka, topic_prefix=settings.worker.topic_prefix) as client:
        other = await compare_lines(
            client, "mlp", lines, live="1", candidate="2", candidate_topic=shadow, window=100
        )
        same = await compare_lines(
            client, "mlp", lines, live="1", candidate="1", candidate_topic=shadow, window=100
        )
        missing = await compare_lines(client, "mlp", lines[:10], candidate="9", window=100)

    assert (other.requests, other.both_ok, other.bad_lines) == (300, 300, 1)
    probs = other.outputs["probs"]
    assert probs.rows == 300
    assert probs.max_abs > 0.01
    assert probs.top_agreement is not None
    assert probs.top_agreement < 0.9  # other weights choose other classes, often
    assert same.outputs["probs"].max_abs == 0.0
    assert same.outputs["probs"].top_agreement == 1.0
    assert (missing.requests, missing.candidate_failed, missing.both_ok) == (10, 10, 0)
    assert len(other.live_seconds) == len(other.candidate_seconds) == 4

    source = tmp_path / "requests.jsonl"
    source.write_text("\n".join(lines) + "\n")
    topic = settings.worker.topic_prefix + "mlp"
    shown = await asyncio.to_thread(
        surge, "shadow", "mlp", str(source), "--live", "1", "--candidate", "2",
        "--candidate-topic", shadow, "--topic", topic, "--bootstrap", kafka,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "300 requests (1 bad lines skipped): 300 answered by both" in shown.stdout
    assert "probs" in shown.stdout
    assert "top-1 agreement" in shown.stdout
