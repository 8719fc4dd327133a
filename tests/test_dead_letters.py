"""`surge dlq inspect` summarises a dead-letter topic; `surge dlq replay` re-publishes the
chosen records to their source topic once the cause is fixed, never twice for one request."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from surge.config import Settings
from surge.producers import request_body, request_headers
from surge.schemas import MSGPACK
from surge.workers import Worker
from tests.conftest import make_settings
from tests.helpers import create_topics, publish, read_topic
from tests.test_cli import surge

pytestmark = pytest.mark.integration


async def test_inspect_then_replay_once(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    run = uuid.uuid4().hex[:8]
    dead_letters, replies = f"test.dlq.{run}", f"test.replies.{run}"
    settings = make_settings(kafka, model_root, None, SURGE_WORKER__DEAD_LETTER_TOPIC=dead_letters)
    topic = settings.worker.topic_prefix + "mlp"
    await create_topics(kafka, topic, dead_letters, replies)
    await run_worker(settings)
    x = {"x": np.ones((1, 32), np.float32)}
    lost = [  # the producer forgot surge-reply-to: every one is dead-lettered
        (
            topic,
            f"{run}-{i}".encode(),
            request_body(x, f"{run}-{i}", MSGPACK),
            request_headers(model="mlp", content_type=MSGPACK, reply_to=None),
        )
        for i in range(20)
    ]
    await publish(kafka, lost)
    await read_topic(kafka, dead_letters, until=20, key_of=None)

    inspect = surge("dlq", "inspect", "--topic", dead_letters, "--bootstrap", kafka)
    assert inspect.returncode == 0, inspect.stderr
    assert "invalid_reply_to" in inspect.stdout
    assert "20" in inspect.stdout

    common = (
        "--topic",
        dead_letters,
        "--bootstrap",
        kafka,
        "--reason",
        "invalid_reply_to",
        "--reply-to",
        replies,
    )
    dry = surge("dlq", "replay", *common, "--dry-run")
    assert "would replay 20" in dry.stdout, dry.stdout + dry.stderr
    first = surge("dlq", "replay", *common)
    assert "replayed 20" in first.stdout, first.stdout + first.stderr
    results = await read_topic(kafka, replies, until=20)
    assert sorted(results) == sorted(f"{run}-{i}" for i in range(20))

    again = surge("dlq", "replay", *common)  # the cause is fixed and they are answered
    assert "replayed 0" in again.stdout
    assert "20 already answered" in again.stdout
    none = surge("dlq", "replay", *common[:4], "--reason", "model_error")
    assert "selected 0" in none.stdout
