"""Shadow comparison through a real worker serving two versions: the candidate's copies on a
topic of their own, every pair of results compared."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from surge.config import Settings
from surge.examples import MLP_CONFIG, write_mlp
from surge.producers import Prediction, PredictionError, SurgeClient
from surge.producers.shadow import ShadowReport, compare_lines, compare_pair
from surge.workers import Worker
from tests.conftest import make_settings
from tests.helpers import LARGE_LINE, SMALL_LINE, SMALL_TOPIC_CONFIGS, create_topics
from tests.test_cli import surge

NAN, INF = float("nan"), float("inf")


def _prediction(version: str, **outputs: np.ndarray) -> Prediction:
    return Prediction("r", "mlp", version, outputs)


@pytest.mark.parametrize(
    ("live", "candidate", "nonfinite", "max_abs"),
    [
        pytest.param([[1.0, NAN]], [[1.0, 2.0]], 1, INF, id="nan-on-the-live-side"),
        pytest.param([[1.0, 2.0]], [[NAN, 2.0]], 1, INF, id="nan-on-the-candidate-side"),
        pytest.param([[INF, 2.0]], [[-INF, 2.0]], 1, INF, id="opposite-infinities"),
        pytest.param([[NAN, INF]], [[NAN, INF]], 0, 0.0, id="same-nan-and-infinity"),
        pytest.param([[1.0, NAN]], [[1.5, NAN]], 0, 0.5, id="nan-on-both-sides"),
    ],
)
def test_nan_or_infinity_on_one_side_is_a_disagreement(
    live: list[list[float]], candidate: list[list[float]], nonfinite: int, max_abs: float
) -> None:
    report = ShadowReport()
    first = _prediction("1", y=np.array(live, np.float32))
    compare_pair(first, _prediction("2", y=np.array(candidate, np.float32)), report)
    diff = report.outputs["y"]
    assert (diff.nonfinite, diff.max_abs) == (nonfinite, max_abs)
    assert np.isfinite(diff.mean_abs)


def test_outputs_of_another_kind_are_a_mismatch_and_the_comparison_goes_on() -> None:
    report = ShadowReport()
    y, label = np.array([[0.1, 0.9]], np.float32), np.array(["cat"], object)
    live = _prediction("1", y=y, label=label)
    candidate = _prediction("2", y=np.array([["a", "b"]], object), label=np.array([1], np.int64))
    compare_pair(live, candidate, report)
    compare_pair(live, _prediction("2", y=y, label=label), report)
    compare_pair(live, PredictionError("model_error", "boom", "r"), report)
    assert (report.requests, report.both_ok, report.candidate_failed) == (3, 2, 1)
    assert report.failed == 1
    for name in ("y", "label"):
        assert report.outputs[name].mismatched == 1
        assert report.outputs[name].max_abs == INF
    assert report.outputs["y"].top_agreed == 1  # the pair that matched was still compared


def test_every_output_and_every_row_is_counted_and_integers_compare_exactly() -> None:
    report = ShadowReport()
    live = _prediction(
        "1",
        ids=np.array([[2**53, 7]], np.int64),  # float64 cannot tell 2**53 from 2**53 + 1
        label=np.array(["cat", "dog", "cow"], object),  # three rows
    )
    candidate = _prediction(
        "2",
        ids=np.array([[2**53 + 1, 7]], np.int64),
        label=np.array(["cat", "dot", "cow"], object),
        extra=np.array([[1.0]], np.float32),  # only the candidate has it
    )
    compare_pair(live, candidate, report)
    ids, label, extra = (report.outputs[name] for name in ("ids", "label", "extra"))
    assert (ids.max_abs, ids.top_agreed, ids.top_compared) == (1.0, 1, 1)
    assert (label.rows, label.unequal_text, label.max_abs) == (3, 1, INF)
    assert (extra.mismatched, extra.max_abs) == (1, INF)


def _two_versions(model_root: Path) -> None:
    """Versions 1 and 2 of the MLP, both served, with other weights."""
    both = MLP_CONFIG + 'version_policy = "all"\n'
    write_mlp(model_root, 1, seed=0, config=both)
    write_mlp(model_root, 2, seed=3, config=both)


@pytest.mark.integration
async def test_a_candidate_version_is_compared_with_the_live_one_request_by_request(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker], tmp_path: Path
) -> None:
    _two_versions(model_root)
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
    # One version on both sides compares nothing: counted apart, never as agreement.
    assert (same.requests, same.same_version, same.both_ok, same.outputs) == (300, 300, 0, {})
    assert other.live_versions == Counter({"1": 300})
    assert other.candidate_versions == Counter({"2": 300})
    assert (missing.requests, missing.candidate_failed, missing.both_ok) == (10, 10, 0)
    # Three windows of requests; the fourth held only the bad line: nothing sent, not timed.
    assert len(other.live_seconds) == len(other.candidate_seconds) == 3
    assert other.bad_line_reasons.total() == 1
    ((reason, count),) = missing.candidate_errors.items()
    assert (reason.split(":")[0], count) == ("unknown_version", 10)

    source = tmp_path / "requests.jsonl"
    source.write_text("\n".join(lines) + "\n")
    topic = settings.worker.topic_prefix + "mlp"
    shown = await asyncio.to_thread(
        surge, "shadow", "mlp", str(source), "--live", "1", "--candidate", "2",
        "--candidate-topic", shadow, "--topic", topic, "--bootstrap", kafka,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "300 requests (1 bad lines skipped): 300 answered by both" in shown.stdout
    assert "answered: live by version 1 (300); candidate by version 2 (300)" in shown.stdout
    assert "probs" in shown.stdout
    assert "top-1 agreement" in shown.stdout

    source.write_text("\n".join(lines[:5]) + "\n")
    failing = await asyncio.to_thread(
        surge, "shadow", "mlp", str(source), "--live", "1", "--candidate", "9",
        "--topic", topic, "--bootstrap", kafka,
    )  # fmt: skip
    assert failing.returncode == 1, failing.stdout + failing.stderr  # the candidate failed
    assert "5 failed on 9 only" in failing.stdout
    assert "failed on 9: 5 × unknown_version" in failing.stdout  # and why


@pytest.mark.integration
async def test_a_run_that_compared_nothing_fails_and_says_why(kafka: str, tmp_path: Path) -> None:
    source = tmp_path / "requests.jsonl"
    source.write_text('{"x": [[1.5, 2.5]]}\nnot json\n')
    shown = await asyncio.to_thread(
        surge, "shadow", "mlp", str(source), "--candidate", "2", "--datatype", "int64",
        "--bootstrap", kafka,
    )  # fmt: skip
    assert shown.returncode == 1, shown.stdout + shown.stderr
    assert "0 requests (2 bad lines skipped)" in shown.stdout
    assert "bad lines: 1 ×" in shown.stdout
    assert "median time" not in shown.stdout  # no window was sent


@pytest.mark.integration
async def test_a_live_side_answered_by_the_candidate_itself_is_not_a_comparison(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker], tmp_path: Path
) -> None:
    _two_versions(model_root)
    settings = make_settings(kafka, model_root, None)
    await run_worker(settings)
    rows = np.random.default_rng(1).standard_normal((20, 32)).astype(np.float32)
    lines = [json.dumps({"x": [row.tolist()]}) for row in rows]
    async with SurgeClient(kafka, topic_prefix=settings.worker.topic_prefix) as client:
        # Without `live`, the live side is the latest version: the candidate, 2.
        report = await compare_lines(client, "mlp", lines, candidate="2")
    assert (report.requests, report.same_version, report.both_ok) == (20, 20, 0)
    assert report.outputs == {}  # no agreement reported where nothing was compared
    assert report.live_versions == report.candidate_versions == Counter({"2": 20})

    source = tmp_path / "requests.jsonl"
    source.write_text("\n".join(lines) + "\n")
    where = ("--topic", settings.worker.topic_prefix + "mlp", "--bootstrap", kafka)
    shown = await asyncio.to_thread(surge, "shadow", "mlp", str(source), "--candidate", "2", *where)
    assert shown.returncode == 1, shown.stdout + shown.stderr  # nothing compared
    assert "answered: live by version 2 (20); candidate by version 2 (20)" in shown.stdout
    assert "NOT COMPARED: 20 requests" in shown.stdout
    assert "Pass --live" in shown.stdout
    same = surge("shadow", "mlp", str(source), "--candidate", "2", "--live", "2", *where)
    assert same.returncode == 2, same.stdout + same.stderr
    assert "nothing to compare" in same.stderr


@pytest.mark.integration
async def test_a_request_kafka_refuses_is_counted_and_the_run_goes_on(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker], tmp_path: Path
) -> None:
    _two_versions(model_root)
    settings = make_settings(kafka, model_root, None)
    topic = settings.worker.topic_prefix + "mlp"
    await create_topics(kafka, topic, configs=SMALL_TOPIC_CONFIGS)
    await run_worker(settings)
    source = tmp_path / "requests.jsonl"
    source.write_text("\n".join([SMALL_LINE] * 6 + [LARGE_LINE] + [SMALL_LINE] * 6) + "\n")
    shown = await asyncio.to_thread(
        surge, "shadow", "mlp", str(source), "--live", "1", "--candidate", "2",
        "--topic", topic, "--bootstrap", kafka,
    )  # fmt: skip
    assert shown.returncode == 1, shown.stdout + shown.stderr  # a request failed
    assert "13 requests" in shown.stdout
    # Kafka refuses a record batch whole: requests that shared the large one's batch are
    # refused with it; the others are compared.
    refused = re.search(r"([\d,]+) refused by Kafka as too large", shown.stdout)
    assert refused is not None, shown.stdout
    assert int(refused[1]) >= 1


def test_a_pair_answered_by_one_version_is_counted_apart_not_compared() -> None:
    report = ShadowReport()
    y = np.array([[0.1, 0.9]], np.float32)
    compare_pair(_prediction("2", y=y), _prediction("2", y=y), report)
    compare_pair(_prediction("1", y=y), _prediction("2", y=y + 0.5), report)
    assert (report.requests, report.same_version, report.both_ok) == (2, 1, 1)
    assert report.outputs["y"].rows == 1
    assert report.outputs["y"].max_abs == pytest.approx(0.5)
    assert report.live_versions == Counter({"1": 1, "2": 1})
    assert report.candidate_versions == Counter({"2": 2})
