"""Fault-test plumbing: publish a numbered stream of requests, count results per request id,
and report each scenario's figures (requests, lost, duplicated, recovery time)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from surge.producers import request_body, request_headers
from surge.schemas import MSGPACK

# Fault tests keep every scenario in CI but scale their counts down there.
SCALE = 0.25 if os.environ.get("CI") == "true" else 1.0


def scaled(count: int) -> int:
    return max(200, int(count * SCALE))


@dataclass
class FaultReport:
    scenario: str
    injected: str
    requests: int
    lost: int
    duplicated: int
    recovery_s: float
    note: str = ""

    def save(self) -> None:
        """Print the figures, and append them to $SURGE_FAULT_REPORT (bench/faults.py)."""
        print(f"FAULT {json.dumps(asdict(self))}")
        target = os.environ.get("SURGE_FAULT_REPORT")
        if target:
            with Path(target).open("a") as f:
                f.write(json.dumps(asdict(self)) + "\n")


def requests(
    topic: str, count: int, *, reply_to: str, run: str
) -> Iterator[tuple[str, bytes, bytes, list[tuple[str, bytes]]]]:
    """(topic, key, value, headers) for `count` MLP requests with ids `<run>-<i>`."""
    x = {"x": np.ones((1, 32), np.float32)}
    route = request_headers(model="mlp", content_type=MSGPACK, reply_to=reply_to)
    for i in range(count):
        request_id = f"{run}-{i}"
        yield topic, request_id.encode(), request_body(x, request_id, MSGPACK), route


def tally(results: dict[str, list[object]], run: str, count: int) -> tuple[int, int]:
    """(lost, duplicated) over the ids `<run>-0 .. <run>-<count-1>`."""
    expected = {f"{run}-{i}" for i in range(count)}
    lost = len(expected - set(results))
    duplicated = sum(len(v) - 1 for k, v in results.items() if k in expected)
    return lost, duplicated


class Stopwatch:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self) -> float:
        return round(time.monotonic() - self.started, 2)
