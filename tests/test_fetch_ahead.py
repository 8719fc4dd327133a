"""A worker fetches no further ahead of a model than `fetch_ahead_s` of its model time: a
backlog stays in Kafka, not in one worker, and every request of it is still served once."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from surge.config import Settings
from surge.producers import request_body, request_headers
from surge.schemas import MSGPACK
from surge.workers.worker import Worker
from tests.conftest import make_settings
from tests.helpers import Peaks, create_topics, publish, read_topic
from tests.models import write_steady

pytestmark = pytest.mark.integration

AHEAD_S = 0.5
POLL_RECORDS = 8


def _requests(topic: str, replies: str, run: str, first: int, count: int) -> list:
    route = request_headers(model="steady", content_type=MSGPACK, reply_to=replies)
    x = np.ones((1, 4), np.float32)
    return [
        (topic, f"{run}-{i}".encode(), request_body({"x": x}, f"{run}-{i}", MSGPACK), route)
        for i in range(first, first + count)
    ]


async def test_a_backlog_stays_in_kafka_past_fetch_ahead_and_is_all_served(
    kafka: str, tmp_path: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    root = tmp_path / "models"
    write_steady(root)  # 4 rows a call, tens of ms each
    settings = make_settings(
        kafka,
        root,
        None,
        SURGE_WORKER__FETCH_AHEAD_S=str(AHEAD_S),
        SURGE_WORKER__MAX_POLL_RECORDS=str(POLL_RECORDS),
    )
    worker = await run_worker(settings)
    topic, run = settings.worker.topic_prefix + "steady", uuid.uuid4().hex[:8]
    replies = f"test.replies.{run}"
    await create_topics(kafka, replies)

    warm = 16  # the batcher learns the model's speed
    await publish(kafka, _requests(topic, replies, run, 0, warm))
    await read_topic(kafka, replies, until=warm)
    batcher = worker._repository.served[("steady", 1)].batcher
    # Taken ahead at most: the limit's rows, a fetch past it, two batches (the floor) and
    # the one running; the backlog is several times that.
    bound = AHEAD_S * batcher._speed + POLL_RECORDS + 3 * 4
    backlog = max(300, int(4 * bound))

    def stopped() -> float:  # what an operator sees: fetching for the model stopped
        return REGISTRY.get_sample_value("surge_fetch_stopped", {"model": "steady"}) or 0.0

    peaks = Peaks(
        0.002,
        records=lambda: worker._ledger.records,
        stopped=stopped,
        speed=lambda: batcher._speed,
    )
    async with peaks as peak:
        await publish(kafka, _requests(topic, replies, run, warm, backlog))
        results = await read_topic(kafka, replies, until=warm + backlog, timeout=120)
    # The limit is model time at the speed the worker measures as it goes: at its fastest,
    # it takes the most rows.
    bound = max(bound, AHEAD_S * peak["speed"] + POLL_RECORDS + 3 * 4)

    expected = {f"{run}-{i}" for i in range(warm + backlog)}
    assert set(results) == expected
    assert all(len(replies) == 1 for replies in results.values())
    assert all(r.headers["surge-status"] == b"ok" for [r] in results.values())
    # The estimate lags the calls it follows: allow it half as much again.
    assert 0 < peak["records"] <= 1.5 * bound, (peak["records"], bound, backlog)
    assert peak["stopped"] == 1
    assert stopped() == 0  # fetching again, once the backlog ran
