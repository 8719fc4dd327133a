"""`surge dlq inspect` summarises a dead-letter topic; `surge dlq replay` re-publishes the
chosen records to their source topic once the cause is fixed, never twice for one request."""

from __future__ import annotations

import re
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
from tests.services import free_port
from tests.test_cli import surge

pytestmark = pytest.mark.integration


async def _dead_letter_lost_requests(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker], count: int
) -> tuple[str, str]:
    """Publish `count` requests without surge-reply-to, which a worker dead-letters:
    (run, dead-letter topic). Request ids are `{run}-{i}`."""
    run = uuid.uuid4().hex[:8]
    dead_letters = f"test.dlq.{run}"
    settings = make_settings(kafka, model_root, None, SURGE_WORKER__DEAD_LETTER_TOPIC=dead_letters)
    topic = settings.worker.topic_prefix + "mlp"
    await create_topics(kafka, topic, dead_letters)
    await run_worker(settings)
    x = {"x": np.ones((1, 32), np.float32)}
    lost = [
        (
            topic,
            f"{run}-{i}".encode(),
            request_body(x, f"{run}-{i}", MSGPACK),
            request_headers(model="mlp", content_type=MSGPACK, reply_to=None),
        )
        for i in range(count)
    ]
    await publish(kafka, lost)
    await read_topic(kafka, dead_letters, until=count, key_of=None)
    return run, dead_letters


async def test_inspect_then_replay_once(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    run, dead_letters = await _dead_letter_lost_requests(kafka, model_root, run_worker, 20)
    replies = f"test.replies.{run}"
    await create_topics(kafka, replies)

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


async def test_replay_skips_letters_with_nowhere_to_reply_unless_given_one(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    """Without a reply target there is no result to find: every replay would run it again."""
    run, dead_letters = await _dead_letter_lost_requests(kafka, model_root, run_worker, 5)
    common = ("--topic", dead_letters, "--bootstrap", kafka)
    out = surge("dlq", "replay", *common)
    assert out.returncode == 0, out.stderr
    assert "replayed 0" in out.stdout, out.stdout + out.stderr
    assert "5 without a reply target" in out.stdout
    assert "pass --reply-to" in out.stdout
    given = surge("dlq", "replay", *common, "--reply-to", f"test.replies.{run}", "--dry-run")
    assert "would replay 5" in given.stdout, given.stdout + given.stderr


async def test_replay_until_the_last_time_inspect_shows_takes_every_letter(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    run, dead_letters = await _dead_letter_lost_requests(kafka, model_root, run_worker, 5)
    common = ("--topic", dead_letters, "--bootstrap", kafka)
    inspect = surge("dlq", "inspect", *common)
    assert inspect.returncode == 0, inspect.stderr
    _first, last = re.findall(r"\d{4}-\d\d-\d\dT\S+\+00:00", inspect.stdout)
    until = ("--until", last, "--reply-to", f"test.replies.{run}", "--dry-run")
    dry = surge("dlq", "replay", *common, *until)
    assert "selected 5: would replay 5" in dry.stdout, inspect.stdout + dry.stdout + dry.stderr


@pytest.mark.parametrize("action", ["inspect", "replay"])
def test_dlq_explains_an_unreachable_broker(action: str) -> None:
    out = surge("dlq", action, "--topic", "x", "--bootstrap", f"127.0.0.1:{free_port()}")
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.startswith("Kafka at 127.0.0.1:")
    assert len(out.stderr.splitlines()) == 1, out.stderr  # no traceback, no "Unclosed ..."


async def test_replay_explains_an_unreachable_redis_without_its_password(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    _, dead_letters = await _dead_letter_lost_requests(kafka, model_root, run_worker, 1)
    redis_url = f"redis://:hunter2@127.0.0.1:{free_port()}"
    args = ("--topic", dead_letters, "--bootstrap", kafka, "--reply-to", "redis")
    out = surge("dlq", "replay", *args, "--redis-url", redis_url)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.startswith("Redis: ")
    assert len(out.stderr.splitlines()) == 1, out.stderr
    assert "hunter2" not in out.stderr
