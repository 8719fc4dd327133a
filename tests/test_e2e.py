"""End to end on real services: requests published with a plain Kafka client, in JSON and
msgpack, served by two `surge worker` processes, results to a reply topic and to Redis."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import pytest

from surge.producers import read_redis_result, read_result
from surge.producers.requests import Prediction
from surge.schemas import JSON, MSGPACK, headers
from tests.conftest import WorkerProcess, topic_of, worker_env
from tests.helpers import create_topics, publish, read_redis, read_topic, reference

pytestmark = pytest.mark.integration

COUNT = 5_000


def _body(request_id: str, x: np.ndarray, content_type: str) -> bytes:
    """Written by hand, as a client in another language would."""
    if content_type == JSON:
        tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}
        return json.dumps({"id": request_id, "inputs": [tensor]}).encode()
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.tobytes()}
    return msgspec.msgpack.encode({"id": request_id, "inputs": [tensor]})


@pytest.fixture(params=["kafka", "noida"])
def broker(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue(request.param)


async def test_plain_clients_two_workers_both_reply_targets(
    broker: str,
    redis_url: str,
    model_root: Path,
    worker_processes: Callable[[dict[str, str]], WorkerProcess],
) -> None:
    run = uuid.uuid4().hex[:8]
    reply_topic = f"test.replies.{run}"
    env = worker_env(broker, model_root, redis_url)
    topic = topic_of(env, "mlp")
    await create_topics(broker, topic, reply_topic)
    workers = [worker_processes(env), worker_processes(env)]
    for worker in workers:
        worker.wait_for("partitions_assigned")

    rng = np.random.default_rng(1)
    rows = 1 + np.arange(COUNT) % 3
    inputs = [rng.standard_normal((int(r), 32)).astype(np.float32) for r in rows]
    plan = []  # (request id, content type, reply target)
    records = []
    for i, x in enumerate(inputs):
        request_id = f"{run}-{i}"
        content_type = JSON if i % 2 else MSGPACK
        reply_to = headers.REPLY_TO_REDIS if i % 4 >= 2 else reply_topic
        route = [
            (headers.CONTENT_TYPE, content_type.encode()),
            (headers.REPLY_TO, reply_to.encode()),
        ]
        plan.append((request_id, content_type, reply_to))
        body = _body(request_id, x, content_type)
        records.append((topic, request_id.encode(), body, route))
    await publish(broker, records)

    kafka_ids = [request_id for request_id, _, target in plan if target == reply_topic]
    redis_ids = [request_id for request_id, _, target in plan if target != reply_topic]
    from_kafka = await read_topic(broker, reply_topic, until=len(kafka_ids), timeout=120)
    from_redis = await read_redis(redis_url, redis_ids, timeout=60)
    assert set(from_kafka) == set(kafka_ids), f"{len(set(kafka_ids) - set(from_kafka))} missing"
    assert set(from_redis) == set(redis_ids)

    expected = reference(str(model_root / "mlp" / "1" / "model.onnx"), np.concatenate(inputs))
    starts = np.concatenate([[0], np.cumsum(rows)])
    for i, (request_id, content_type, reply_to) in enumerate(plan):
        if reply_to == reply_topic:
            reply = from_kafka[request_id][0]
            assert reply.key == request_id.encode()
            assert reply.headers[headers.CONTENT_TYPE] == content_type.encode()
            result = read_result(reply.value, content_type, reply.headers[headers.STATUS].decode())
        else:
            result = read_redis_result(from_redis[request_id], content_type)
        assert isinstance(result, Prediction), result
        assert (result.id, result.model_name, result.model_version) == (request_id, "mlp", "1")
        np.testing.assert_allclose(
            result.outputs["probs"], expected[starts[i] : starts[i + 1]], rtol=1e-5, atol=1e-6
        )

    for worker in workers:
        assert worker.terminate() == 0
    served = [
        sum(
            e.get("event") == "partitions_assigned" and bool(e.get("partitions"))
            for e in w.events()
        )
        for w in workers
    ]
    assert all(served), "each worker process held partitions"
