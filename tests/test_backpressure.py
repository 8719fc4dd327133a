"""Results count against `max_in_flight_bytes` from the moment their request is queued until
they are durable: a model whose outputs are far larger than its requests stops fetching on
the size of its results, and every request is still answered once. Neither bound is passed
by the rest of a fetch (up to `max_poll_records` records): what does not fit is read again."""

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
from tests.helpers import Peaks, create_topics, publish, read_topic
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
    ledger = worker._ledger
    in_flight = Peaks(0.001, records=lambda: ledger.records, bytes=lambda: ledger.bytes)
    async with in_flight as peak:
        results = await read_topic(kafka, replies, until=BACKLOG, timeout=120)

    assert set(results) == {f"{run}-{i}" for i in range(BACKLOG)}
    assert all(len(answers) == 1 for answers in results.values())
    assert all(len(r.value) > RESULT for [r] in results.values())
    # A queued request counts its outputs' bytes before they exist: the worker took in no
    # more than the bound's worth of results, and a fetch of 400 did not pass it.
    assert peak["bytes"] >= BOUND - 2 * RESULT, "the results never neared the bound: no load"
    assert peak["records"] <= BOUND // RESULT + 1, peak["records"]
    assert peak["bytes"] <= BOUND + RESULT, peak["bytes"]
    await asyncio.sleep(0.2)
    assert (worker._ledger.records, worker._ledger.bytes) == (0, 0)


async def test_a_fetch_takes_no_more_records_than_the_bound_has_room_for(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    settings = make_settings(kafka, model_root, None, SURGE_WORKER__MAX_IN_FLIGHT="20")
    topic, run = settings.worker.topic_prefix + "mlp", uuid.uuid4().hex[:8]
    replies = f"test.replies.{run}"
    await create_topics(kafka, topic, replies, partitions=2)
    route = request_headers(model="mlp", content_type=MSGPACK, reply_to=replies)
    x = {"x": np.ones((1, 32), np.float32)}
    ids = [f"{run}-{i}" for i in range(2000)]
    await publish(kafka, [(topic, i.encode(), request_body(x, i, MSGPACK), route) for i in ids])
    worker = await run_worker(settings)
    async with Peaks(records=lambda: worker._ledger.records) as peak:
        results = await read_topic(kafka, replies, until=len(ids), timeout=120)
    assert sorted(results) == sorted(ids)
    assert all(len(answers) == 1 for answers in results.values())
    assert 10 <= peak["records"] <= 20, peak["records"]
