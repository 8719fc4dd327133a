"""Scoring a file through real workers: one result line per input line, in input order, a bad
line answered in its place rather than stopping the run."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from surge.config import Settings
from surge.producers import SurgeClient
from surge.producers.scoring import score_lines
from surge.workers import Worker
from tests.conftest import make_settings
from tests.helpers import reference
from tests.test_cli import surge

pytestmark = pytest.mark.integration


async def test_a_file_is_scored_in_order_with_bad_lines_answered_in_place(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    settings = make_settings(kafka, model_root, None)
    await run_worker(settings)
    rows = np.random.default_rng(0).standard_normal((1200, 32)).astype(np.float32)
    lines = [json.dumps({"x": [row.tolist()]}) for row in rows]
    lines[10] = "{not json"
    lines[20] = json.dumps({"x": [[1.0, 2.0]]})  # the model takes 32 features
    lines[30] = "[1, 2]"
    out = io.StringIO()
    async with SurgeClient(kafka, topic_prefix=settings.worker.topic_prefix) as client:
        report = await score_lines(client, "mlp", lines, out, window=100, in_flight=3)

    results = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["line"] for r in results] == list(range(1, 1201))
    assert (report.lines, report.ok, report.errors, report.timed_out) == (1200, 1197, 3, 0)
    assert [results[i]["code"] for i in (10, 20, 30)] == ["bad_line", "invalid_input", "bad_line"]
    good = [i for i in range(1200) if i not in (10, 20, 30)]
    scored = np.array([results[i]["outputs"]["probs"][0] for i in good], np.float32)
    expected = reference(str(model_root / "mlp" / "1" / "model.onnx"), rows)
    np.testing.assert_allclose(scored, expected[good], rtol=1e-5, atol=1e-6)


async def test_surge_score_writes_a_result_line_per_input_line(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker], tmp_path: Path
) -> None:
    settings = make_settings(kafka, model_root, None)
    await run_worker(settings)
    source, results = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    row = json.dumps({"x": [[0.5] * 32]})
    source.write_text("\n".join([row] * 50 + ["", "{oops"]) + "\n")
    where = ["--bootstrap", kafka, "--topic", settings.worker.topic_prefix + "mlp"]
    scored = await asyncio.to_thread(surge, "score", "mlp", str(source), "-o", str(results), *where)
    assert scored.returncode == 1, scored.stderr  # not every line was scored
    assert "52 lines" in scored.stderr
    assert "50 ok, 2 errors" in scored.stderr
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    # Blank or not, every line of the file has its result line: the numbers stay the file's.
    assert [line.get("code") for line in lines] == [None] * 50 + ["bad_line"] * 2
    assert [line["line"] for line in lines] == list(range(1, 53))

    missing = surge("score", "mlp", str(tmp_path / "nowhere.jsonl"), "-o", str(results), *where)
    assert missing.returncode == 2
    assert "nowhere.jsonl" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert len(results.read_text().splitlines()) == 52  # the earlier results are still there
