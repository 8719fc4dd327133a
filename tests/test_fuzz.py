"""Hostile and broken input: decoders and routing never raise, and through a real worker
every one of 10,000 random and mutated messages ends as a result or a dead letter while
valid traffic interleaved with them is still served correctly."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import pytest
from aiokafka import TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from surge.config import Settings
from surge.producers import Prediction, read_result
from surge.schemas import JSON, MSGPACK, ErrorCode, headers
from surge.workers import Rejection, Router, Worker
from surge.workers.intake import Job, admit
from surge.workers.runtimes import TensorSpec
from tests.conftest import make_settings
from tests.faults.harness import FaultReport, scaled
from tests.helpers import (
    create_topics,
    make_ticket,
    publish,
    read_topic,
    reference,
    wait_committed,
)

SPECS = [TensorSpec("x", "FP32", (32,))]
VALID = {
    "id": "v",
    "inputs": [{"name": "x", "shape": [1, 32], "datatype": "FP32", "data": [0.5] * 32}],
}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)


def _admit(body: bytes, content_type: str) -> Job | Rejection:
    return admit(make_ticket(body, content_type), SPECS, [], max_rows=64, max_elements=1 << 16)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.sampled_from([JSON, MSGPACK]))
def test_arbitrary_bytes_never_raise(body: bytes, content_type: str) -> None:
    assert isinstance(_admit(body, content_type), Job | Rejection)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(json_values, st.sampled_from([JSON, MSGPACK]))
def test_arbitrary_structures_never_raise(value: object, content_type: str) -> None:
    body = json.dumps(value).encode() if content_type == JSON else msgspec.msgpack.encode(value)
    assert isinstance(_admit(body, content_type), Job | Rejection)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from(["name", "shape", "datatype", "data", "parameters"]), json_values
    )
)
def test_arbitrary_tensors_never_raise(tensor: dict[str, object]) -> None:
    body = json.dumps({"inputs": [tensor]}).encode()
    result = _admit(body, JSON)
    assert isinstance(result, Job | Rejection)


@settings(max_examples=300)
@given(st.lists(st.tuples(st.text(max_size=20), st.binary(max_size=20) | st.none()), max_size=8))
def test_arbitrary_headers_never_raise(fields: list[tuple[str, bytes | None]]) -> None:
    router = Router(
        {"t": "m"},
        reply_topic_pattern=r"[a-z.]+",
        default_reply_to="",
        max_message_bytes=1000,
        redis_enabled=False,
        forbidden_reply_topics=["t"],
    )

    class _R:
        topic, partition, offset, key, value = "t", 0, 1, None, b""
        headers = fields

    router.ticket(_R(), TopicPartition("t", 0), received=0.0)  # type: ignore[arg-type]


def test_deep_nesting_is_rejected_not_crashed() -> None:
    deep = b'{"inputs": [{"name":"x","shape":[1],"datatype":"FP32","data":' + b"[" * 100_000
    result = _admit(deep + b"]" * 100_000 + b"}]}", JSON)
    assert isinstance(result, Rejection)
    assert result.code is ErrorCode.INVALID_REQUEST


def _mutate(rng: random.Random, body: bytes) -> bytes:
    data = bytearray(body)
    match rng.randrange(6):
        case 0:  # flip bytes
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        case 1:  # truncate
            del data[rng.randrange(len(data)) :]
        case 2:  # insert junk
            at = rng.randrange(len(data))
            data[at:at] = rng.randbytes(rng.randint(1, 16))
        case 3:  # random bytes altogether
            return rng.randbytes(rng.randint(0, 200))
        case 4:  # hostile but well-formed values
            hostile = json.loads(json.dumps(VALID))
            tensor = hostile["inputs"][0]
            key, value = rng.choice(
                [
                    ("shape", [10**12, 32]),
                    ("shape", [-1, 32]),
                    ("shape", [1, 32, 1]),
                    ("datatype", "FP99"),
                    ("data", ["x"] * 32),
                    ("data", [[1] * 32] * 2),
                    ("data", [1e308] * 32),
                    ("name", ""),
                    ("data", None),
                ]
            )
            tensor[key] = value
            return json.dumps(hostile).encode()
        case _:  # swap the encoding the header claims
            return msgspec.msgpack.encode(json.loads(body)) if body[:1] == b"{" else body
    return bytes(data)


@pytest.mark.integration
async def test_ten_thousand_hostile_messages_through_a_worker(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    count = scaled(10_000)
    rng = random.Random(11)
    settings_ = make_settings(
        kafka, model_root, None, SURGE_WORKER__DEAD_LETTER_TOPIC=f"test.dlq.{uuid.uuid4().hex[:6]}"
    )
    topic = settings_.worker.topic_prefix + "mlp"
    replies, dead_letters = (
        f"test.replies.{uuid.uuid4().hex[:8]}",
        settings_.worker.dead_letter_topic,
    )
    await create_topics(kafka, topic, replies, dead_letters)
    worker = await run_worker(settings_)

    valid_json = json.dumps(VALID).encode()
    records, valid_keys = [], []
    for i in range(count):
        key = f"m{i}"
        content_type = rng.choice([JSON, MSGPACK])
        fields = {headers.CONTENT_TYPE: content_type}
        if rng.random() < 0.95:
            fields[headers.REPLY_TO] = replies
        if rng.random() < 0.1:
            fields[rng.choice([headers.VERSION, headers.DEADLINE_MS, headers.MODEL])] = rng.choice(
                ["", "1", "-5", "99", "x" * 300, "mlp", "nope"]
            )
        if i % 3 == 0:  # valid traffic, interleaved
            x = np.full((1, 32), i % 7, np.float32)
            body = (
                json.dumps(
                    {
                        "inputs": [
                            {
                                "name": "x",
                                "shape": [1, 32],
                                "datatype": "FP32",
                                "data": x.ravel().tolist(),
                            }
                        ]
                    }
                ).encode()
                if content_type == JSON
                else msgspec.msgpack.encode(
                    {
                        "inputs": [
                            {"name": "x", "shape": [1, 32], "datatype": "FP32", "data": x.tobytes()}
                        ]
                    }
                )
            )
            fields = {headers.CONTENT_TYPE: content_type, headers.REPLY_TO: replies}
            valid_keys.append((key, x, content_type))
        else:
            body = _mutate(rng, valid_json)
        records.append((topic, key.encode(), body, [(k, v.encode()) for k, v in fields.items()]))
    await publish(kafka, records)

    to_results = sum(1 for r in records if any(k == headers.REPLY_TO for k, _ in r[3]))
    results = await read_topic(kafka, replies, until=to_results, timeout=120, key_of=None)
    letters = await read_topic(
        kafka, dead_letters, until=count - to_results, timeout=60, key_of=None
    )
    answered = set(results) | set(letters)
    missing = {r[1].decode() for r in records} - answered
    FaultReport(
        "hostile input",
        f"{count:,} random and mutated messages, 1/3 valid",
        count,
        len(missing),
        sum(len(v) - 1 for v in results.values()),
        0.0,
        f"{len(results):,} results, {len(letters):,} dead letters",
    ).save()
    assert not missing, f"{len(missing)} messages got neither a result nor a dead letter"
    expected = reference(
        str(model_root / "mlp" / "1" / "model.onnx"), np.concatenate([x for _, x, _ in valid_keys])
    )
    for row, (key, _, content_type) in enumerate(valid_keys):
        (reply,) = results[key]
        result = read_result(reply.value, content_type, reply.headers[headers.STATUS].decode())
        assert isinstance(result, Prediction), (key, result)
        np.testing.assert_allclose(result.outputs["probs"][0], expected[row], rtol=1e-5, atol=1e-6)
    await wait_committed(kafka, worker.settings.worker.group_id, topic)
