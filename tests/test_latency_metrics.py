"""The worker's own latency metrics, on real Kafka and Redis: how old records are when taken
in (from their timestamps), and how long each takes from intake to a durable outcome."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import REGISTRY

from surge.config import Settings
from surge.examples import write_mlp
from surge.producers import request_body, request_headers
from surge.schemas import MSGPACK
from surge.schemas.headers import REPLY_TO_REDIS
from surge.workers import Worker
from tests.conftest import make_settings
from tests.helpers import create_topics, read_redis, read_topic
from tests.services import free_port

pytestmark = pytest.mark.integration

BEHIND_S = 120  # the requests' timestamps: as if the worker were two minutes behind


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_record_age_and_outcome_time(
    kafka: str, redis_url: str, model_root: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    run = uuid.uuid4().hex[:8]
    replies = f"test.replies.{run}"
    settings = make_settings(kafka, model_root, redis_url)
    topic = settings.worker.topic_prefix + "mlp"
    await create_topics(kafka, topic, replies)
    age = {"topic": topic}
    outcome = {target: {"target": target} for target in ("kafka", "redis")}
    before = {
        (target, part): _sample(f"surge_outcome_seconds_{part}", labels)
        for target, labels in outcome.items()
        for part in ("count", "sum")
    }
    await run_worker(settings)

    to_kafka, to_redis = [f"{run}-k{i}" for i in range(200)], [f"{run}-r{i}" for i in range(100)]
    body = {"x": np.ones((1, 32), np.float32)}
    stamped = int(time.time() * 1000) - BEHIND_S * 1000
    producer = AIOKafkaProducer(bootstrap_servers=kafka)
    await producer.start()
    try:
        for ids, reply_to in ((to_kafka, replies), (to_redis, REPLY_TO_REDIS)):
            route = request_headers(model="mlp", content_type=MSGPACK, reply_to=reply_to)
            for request_id in ids:
                await producer.send(
                    topic,
                    request_body(body, request_id, MSGPACK),
                    key=request_id.encode(),
                    headers=route,
                    timestamp_ms=stamped,
                )
        await producer.flush()
    finally:
        await producer.stop()
    assert len(await read_topic(kafka, replies, until=len(to_kafka))) == len(to_kafka)
    assert len(await read_redis(redis_url, to_redis)) == len(to_redis)

    # Every fetch of this topic saw records two minutes old: all in the (60 s, 300 s] bucket.
    fetches = _sample("surge_record_age_seconds_count", age)
    assert fetches >= 1
    assert _sample("surge_record_age_seconds_bucket", age | {"le": "60.0"}) == 0
    assert _sample("surge_record_age_seconds_bucket", age | {"le": "300.0"}) == fetches
    assert _sample("surge_record_age_seconds_sum", age) / fetches >= BEHIND_S

    # From intake to durable, each write: quick here, and counted per target.
    for target, labels in outcome.items():
        writes = _sample("surge_outcome_seconds_count", labels) - before[target, "count"]
        seconds = _sample("surge_outcome_seconds_sum", labels) - before[target, "sum"]
        assert writes >= 1, target
        assert 0 < seconds / writes < 30, target


async def test_ready_answers_200_while_serving_and_503_once_stopping(
    kafka: str, model_root: Path
) -> None:
    """A readiness probe paces a rollout: /ready says when the worker can take work."""
    port = free_port()
    worker = Worker(make_settings(kafka, model_root, None, SURGE_METRICS__PORT=str(port)))
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.ready.wait(), 60)
        assert await asyncio.to_thread(_status, f"http://127.0.0.1:{port}/ready") == 200
        assert await asyncio.to_thread(_status, f"http://127.0.0.1:{port}/metrics") == 200
    finally:
        worker.stop()
        await asyncio.wait_for(task, 90)
    assert await asyncio.to_thread(_status, f"http://127.0.0.1:{port}/ready") == 503


@pytest.mark.parametrize("shared", ["[]", '["surge.requests.shared"]'])
async def test_ready_answers_503_until_a_model_is_served(
    kafka: str, tmp_path: Path, shared: str
) -> None:
    """An empty or mis-mounted model root: the pod must not take a serving one's place, even
    subscribed to a shared topic."""
    port = free_port()
    settings = make_settings(
        kafka,
        tmp_path,
        None,
        SURGE_METRICS__PORT=str(port),
        SURGE_WORKER__RELOAD_INTERVAL_S="0.2",
        SURGE_WORKER__SHARED_TOPICS=shared,
    )
    worker = Worker(settings)
    task = asyncio.create_task(worker.run())
    ready = f"http://127.0.0.1:{port}/ready"
    try:
        await asyncio.wait_for(worker.ready.wait(), 60)
        assert await asyncio.to_thread(_status, ready) == 503
        write_mlp(tmp_path)
        deadline = time.monotonic() + 30
        while await asyncio.to_thread(_status, ready) != 200:
            assert time.monotonic() < deadline, "not ready once a model is served"
            await asyncio.sleep(0.1)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 90)
    assert await asyncio.to_thread(_status, ready) == 503


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
