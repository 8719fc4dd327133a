"""SIGTERM under load: stop fetching, finish in-flight batches, publish, commit, leave the
group; a successor resumes where it stopped, losing nothing and repeating nothing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from surge.producers import request_body, request_headers
from surge.schemas import MSGPACK, headers
from tests.conftest import WorkerProcess, topic_of, worker_env
from tests.helpers import create_topics, publish, read_topic, wait_committed

pytestmark = pytest.mark.integration

COUNT = 6_000


async def test_sigterm_mid_load_loses_and_repeats_nothing(
    kafka: str, model_root: Path, worker_processes: Callable[[dict[str, str]], WorkerProcess]
) -> None:
    env = worker_env(kafka, model_root, None)
    group = env["SURGE_WORKER__GROUP_ID"]
    topic = topic_of(env, "mlp")
    await create_topics(kafka, topic)
    reply_topic = f"test.replies.{uuid.uuid4().hex[:8]}"
    await create_topics(kafka, reply_topic, partitions=1)
    first = worker_processes(env)
    first.wait_for("partitions_assigned")

    x = {"x": np.ones((1, 32), np.float32)}
    route = request_headers(model="mlp", content_type=MSGPACK, reply_to=reply_topic)
    records = [
        (topic, str(i).encode(), request_body(x, str(i), MSGPACK), route) for i in range(COUNT)
    ]
    publishing = asyncio.create_task(publish(kafka, records, rate=4000))
    await asyncio.sleep(0.8)  # mid-stream: some served, some queued, some in flight
    assert await asyncio.to_thread(first.terminate) == 0
    assert any(e.get("event") == "worker_stopped" for e in first.events())
    await publishing

    second = worker_processes(env)
    results = await read_topic(kafka, reply_topic, until=COUNT, timeout=60)
    assert len(results) == COUNT, f"{COUNT - len(results)} requests lost"
    duplicates = {k: len(v) for k, v in results.items() if len(v) > 1}
    assert not duplicates, f"{len(duplicates)} requests answered twice"
    assert all(r.headers[headers.STATUS] == b"ok" for v in results.values() for r in v)
    await wait_committed(kafka, group, topic)
    assert second.terminate() == 0
