"""Results count against `max_in_flight_bytes` from the moment their request is queued until
they are durable: a model whose outputs are far larger than its requests stops fetching on
the size of its results, and every request is still answered once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from surge.config import Settings
from surge.producers import request_body, request_headers
from surge.schemas import MSGPACK
from surge.workers.worker import Worker
from tests.conftest import make_settings
from tests.helpers import create_topics, publish, read_topic
from tests.models import write_wide

pytestmark = pytest.mark.integration

BOUND = 1 << 20  # bytes in flight: 16 results of 64 KiB
RESULT = 64 * 1024
BACKLOG = 400


async def test_large_results_pause_fetching_and_are_all_answered(
    kafka: str, tmp_path: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    root = tmp_path / "models"
    write_wide(root)
    settings = make_settings(
        kafka,
        root,
        None,
        SURGE_WORKER__MAX_IN_FLIGHT_BYTES=str(BOUND),
        SURGE_WORKER__MAX_POLL_RECORDS="16",
    )
    topic, run = settings.worker.topic_prefix + "wide", uuid.uuid4().hex[:8]
    replies = f"test.replies.{run}"
    await create_topics(kafka, topic, replies)
    route = request_headers(model="wide", content_type=MSGPACK, reply_to=replies)
    x = np.ones((1, 4), np.float32)
    await publish(
        kafka,
        [
            (topic, f"{run}-{i}".encode(), request_body({"x": x}, f"{run}-{i}", MSGPACK), route)
            for i in range(BACKLOG)
        ],
    )
    worker = await run_worker(settings)
    peak_bytes = peak_records = 0

    async def sample() -> None:
        nonlocal peak_bytes, peak_records
        while True:
            peak_bytes = max(peak_bytes, worker._ledger.bytes)
            peak_records = max(peak_records, worker._ledger.records)
            await asyncio.sleep(0.001)

    sampler = asyncio.create_task(sample())
    results = await read_topic(kafka, replies, until=BACKLOG, timeout=120)
    sampler.cancel()

    assert set(results) == {f"{run}-{i}" for i in range(BACKLOG)}
    assert all(len(answers) == 1 for answers in results.values())
    assert all(len(r.value) > RESULT for [r] in results.values())
    # A queued request counts its outputs' bytes before they exist: the worker took in no
    # more than the bound's worth of results plus the fetch that reached it.
    assert peak_bytes >= BOUND, "the results never reached the bound: the test did not load"
    assert peak_records <= BOUND // RESULT + 16, peak_records
    assert peak_bytes <= 2 * BOUND, peak_bytes
    await asyncio.sleep(0.2)
    assert (worker._ledger.records, worker._ledger.bytes) == (0, 0)
