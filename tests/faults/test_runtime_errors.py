"""A batch that runs out of memory is split and retried at smaller sizes before any request
fails; the worker stays up."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from surge.config import Settings
from surge.producers import Prediction, read_result, request_body, request_headers
from surge.schemas import MSGPACK, headers
from surge.workers import Worker
from tests.conftest import make_settings
from tests.faults.harness import FaultReport
from tests.helpers import create_topics, publish, read_topic
from tests.models import write_cramped

pytestmark = pytest.mark.integration


async def test_out_of_memory_batches_are_split_until_they_fit(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    write_cramped(model_root)
    settings = make_settings(kafka, model_root, None)
    topic, replies = settings.worker.topic_prefix + "cramped", f"test.replies.{uuid.uuid4().hex}"
    await create_topics(kafka, topic, replies)
    await run_worker(settings)
    count = 40  # published at once: batches of up to 40 rows form, 4 fit
    records = [
        (
            topic,
            f"c{i}".encode(),
            request_body({"x": np.full((1, 4), i, np.float32)}, f"c{i}", MSGPACK),
            request_headers(model="cramped", content_type=MSGPACK, reply_to=replies),
        )
        for i in range(count)
    ]
    await publish(kafka, records)
    results = await read_topic(kafka, replies, until=count)
    failed = 0
    for i in range(count):
        (reply,) = results[f"c{i}"]
        result = read_result(reply.value, MSGPACK, reply.headers[headers.STATUS].decode())
        failed += not isinstance(result, Prediction)
        if isinstance(result, Prediction):
            np.testing.assert_array_equal(result.outputs["y"], np.full((1, 4), i + 1))
    FaultReport(
        "out of memory",
        "model fails every batch over 4 rows",
        count,
        failed,
        0,
        0.0,
        "batches halved until they fit; no request failed",
    ).save()
    assert failed == 0
