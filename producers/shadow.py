"""Shadow comparison: the same requests to the live model and to a candidate version, side by
side, before the candidate takes live traffic.

The candidate's copies can go to a topic of their own (`candidate_topic`), consumed by a
worker group that serves the candidate, so that comparing never slows the live path. Each
pair of results is compared output by output: how far apart the values are, and for outputs
with a row of several values (class scores, say), how often the top one agrees. NaN or
infinity on one side only is a disagreement of its own, counted apart from the differences.
A pair whose live answer came from the candidate's own version (the live model's latest
version is the candidate, say) compares nothing: it is counted apart, never as agreement.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from aiokafka.errors import MessageSizeTooLargeError

from surge.producers.client import Result, SurgeClient
from surge.producers.requests import Prediction, PredictionError
from surge.producers.scoring import (
    BadLine,
    Line,
    chunks,
    parse_line,
    request_limit,
)

_NUMERIC = "fiub"  # dtype kinds compared by value; others (strings) only as equal or not


@dataclass(slots=True)
class OutputDiff:
    """One output's differences over the pairs where both sides answered."""

    rows: int = 0  # of the requests both answered (a request may hold several)
    max_abs: float = 0.0  # infinite once anything disagrees beyond measure (see below)
    sum_abs: float = 0.0  # over the values finite on both sides
    elements: int = 0
    mismatched: int = 0  # requests whose output differs in shape or kind, or is missing
    nonfinite: int = 0  # values NaN or infinite on one side and not the same on the other
    unequal_text: int = 0  # string values that differ (they have no distance)
    top_compared: int = 0  # rows with several values, whose top value was compared
    top_agreed: int = 0

    @property
    def mean_abs(self) -> float:
        return self.sum_abs / self.elements if self.elements else 0.0

    @property
    def top_agreement(self) -> float | None:
        return self.top_agreed / self.top_compared if self.top_compared else None


@dataclass(slots=True)
class ShadowReport:
    requests: int = 0
    bad_lines: int = 0
    both_ok: int = 0  # answered by both, by different versions: compared
    same_version: int = 0  # answered by both, by the same version: nothing to compare
    live_failed: int = 0  # the live side failed, the candidate answered
    candidate_failed: int = 0  # the candidate failed, the live side answered
    both_failed: int = 0
    too_large: int = 0  # of the failed: Kafka refused a side's request as too large
    # Why each side failed, and why lines were skipped: "code: message" (or the exception's
    # class and text) and how often.
    live_errors: Counter[str] = field(default_factory=Counter)
    candidate_errors: Counter[str] = field(default_factory=Counter)
    bad_line_reasons: Counter[str] = field(default_factory=Counter)
    live_versions: Counter[str] = field(default_factory=Counter)  # of the answers, per side
    candidate_versions: Counter[str] = field(default_factory=Counter)
    outputs: dict[str, OutputDiff] = field(default_factory=dict)
    live_seconds: list[float] = field(default_factory=list)  # per window: until all answered
    candidate_seconds: list[float] = field(default_factory=list)

    @property
    def lines(self) -> int:
        return self.requests + self.bad_lines

    @property
    def failed(self) -> int:
        """Requests that failed or timed out on either side."""
        return self.live_failed + self.candidate_failed + self.both_failed


async def compare_lines(
    client: SurgeClient,
    model: str,
    lines: Iterable[Line],
    *,
    candidate: str,
    live: str | None = None,
    candidate_topic: str | None = None,
    live_topic: str | None = None,
    dtype: np.dtype[Any] | str = "float32",
    window: int = 256,
    timeout: float = 60.0,
    via: Literal["kafka", "redis"] = "kafka",
    max_request_size: int | None = None,
    report: ShadowReport | None = None,
) -> ShadowReport:
    """Send each line (a JSON object of named arrays, as `score_lines` reads) to the live
    model (version `live`, or its latest) and to version `candidate`, a window of lines at a
    time, both sides at once; compare the results pair by pair. `report`, if given, is
    filled in window by window, so a caller can tell how far an interrupted run got."""
    report = report if report is not None else ShadowReport()
    limit = request_limit(client, model, (live, candidate), max_request_size)
    for chunk in chunks(lines, window):
        parsed = [parse_line(line, dtype, limit) for line in chunk]
        requests = [inputs for inputs in parsed if not isinstance(inputs, BadLine)]
        report.bad_lines += len(parsed) - len(requests)
        report.bad_line_reasons.update(p.reason for p in parsed if isinstance(p, BadLine))
        if not requests:  # nothing to send, nothing timed
            continue
        (live_results, live_s), (candidate_results, candidate_s) = await asyncio.gather(
            _timed(client, model, requests, live, live_topic, timeout, via),
            _timed(client, model, requests, candidate, candidate_topic, timeout, via),
        )
        report.live_seconds.append(live_s)
        report.candidate_seconds.append(candidate_s)
        for first, second in zip(live_results, candidate_results, strict=True):
            compare_pair(first, second, report)
    return report


async def _timed(
    client: SurgeClient,
    model: str,
    requests: list[dict[str, np.ndarray]],
    version: str | None,
    topic: str | None,
    timeout: float,
    via: Literal["kafka", "redis"],
) -> tuple[list[Result | Exception], float]:
    started = time.perf_counter()
    results: list[Result | Exception] = list(
        await client.predict_many(
            model,
            requests,
            version=version,
            topic=topic,
            timeout=timeout,
            via=via,
            return_exceptions=True,
        )
    )
    return results, time.perf_counter() - started


def compare_pair(
    live: Result | Exception, candidate: Result | Exception, report: ShadowReport
) -> None:
    """Add one request's pair of results to `report`."""
    report.requests += 1
    for result, versions in ((live, report.live_versions), (candidate, report.candidate_versions)):
        if isinstance(result, Prediction):
            versions[result.model_version or "?"] += 1
    if not isinstance(live, Prediction) or not isinstance(candidate, Prediction):
        _count_failure(live, candidate, report)
        return
    if live.model_version is not None and live.model_version == candidate.model_version:
        report.same_version += 1  # the candidate against itself: agreement that means nothing
        return
    report.both_ok += 1
    for name, expected in live.outputs.items():
        diff = report.outputs.setdefault(name, OutputDiff())
        diff.rows += expected.shape[0] if expected.ndim else 1
        _compare_output(expected, candidate.outputs.get(name), diff)
    for name in candidate.outputs.keys() - live.outputs.keys():  # new in the candidate
        diff = report.outputs.setdefault(name, OutputDiff())
        diff.mismatched += 1
        diff.max_abs = float("inf")


def _count_failure(
    live: Result | Exception, candidate: Result | Exception, report: ShadowReport
) -> None:
    if isinstance(live, Prediction):
        report.candidate_failed += 1
    elif isinstance(candidate, Prediction):
        report.live_failed += 1
    else:
        report.both_failed += 1
    if any(isinstance(result, MessageSizeTooLargeError) for result in (live, candidate)):
        report.too_large += 1
    for result, errors in ((live, report.live_errors), (candidate, report.candidate_errors)):
        if isinstance(result, Exception):
            errors[_reason(result)] += 1


def _reason(error: Exception) -> str:
    if isinstance(error, PredictionError):
        return f"{error.code}: {error.message}"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _compare_output(expected: np.ndarray, got: np.ndarray | None, diff: OutputDiff) -> None:
    numeric = expected.dtype.kind in _NUMERIC
    if got is None or got.shape != expected.shape or (got.dtype.kind in _NUMERIC) != numeric:
        diff.mismatched += 1  # the candidate's signature differs: nothing agrees
        diff.max_abs = float("inf")
        return
    if not numeric:  # strings: equal or not
        unequal = int((got != expected).sum())
        diff.unequal_text += unequal
        diff.max_abs = max(diff.max_abs, np.inf if unequal else 0.0)
        return
    if expected.dtype.kind in "iu" and got.dtype.kind in "iu":
        _compare_integers(expected, got, diff)
        return
    first, second = expected.astype(np.float64), got.astype(np.float64)
    finite = np.isfinite(first) & np.isfinite(second)
    # Off the finite values, only the same NaN or the same infinity on both sides agrees.
    alike = (first == second) | (np.isnan(first) & np.isnan(second))
    nonfinite = int((~finite & ~alike).sum())
    gap = np.abs(first[finite] - second[finite])
    diff.nonfinite += nonfinite
    diff.max_abs = max(diff.max_abs, float(gap.max(initial=0.0)), np.inf if nonfinite else 0.0)
    diff.sum_abs += float(gap.sum())
    diff.elements += gap.size
    _count_top(expected, got, diff)


def _compare_integers(expected: np.ndarray, got: np.ndarray, diff: OutputDiff) -> None:
    """Exactly: through float64, 2**53 and 2**53 + 1 would agree."""
    gap = np.abs(expected.astype(object) - got.astype(object)).ravel()
    largest = max(gap, default=0)
    diff.max_abs = max(diff.max_abs, float(largest))
    diff.sum_abs += float(sum(gap))
    diff.elements += gap.size
    _count_top(expected, got, diff)


def _count_top(expected: np.ndarray, got: np.ndarray, diff: OutputDiff) -> None:
    """For rows of several values (class scores, say): whether the top one agrees."""
    if expected.ndim >= 2 and expected.shape[-1] > 1:
        rows = expected.reshape(-1, expected.shape[-1])
        diff.top_compared += rows.shape[0]
        diff.top_agreed += int(
            (rows.argmax(axis=1) == got.reshape(rows.shape).argmax(axis=1)).sum()
        )
