"""Results on the client's reply topic: one it cannot read is its caller's error result, at
once, and the results read beside it are kept."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError

from surge.config import Settings
from surge.producers import PredictionError, SurgeClient
from surge.schemas import MSGPACK, ErrorCode, headers
from tests.conftest import make_settings
from tests.helpers import create_topics, read_topic

pytestmark = pytest.mark.integration


async def test_a_result_on_the_reply_topic_the_client_cannot_read_is_its_error_result(
    kafka: str,
) -> None:
    topic = f"surge.requests.unreadable-{uuid.uuid4().hex[:8]}"
    await create_topics(kafka, topic)
    x = {"x": np.ones((1, 4), np.float32)}
    async with SurgeClient(kafka) as client:
        started = time.monotonic()
        call = asyncio.create_task(
            client.predict_many("mlp", [x, x, x], topic=topic, timeout=30, return_exceptions=True)
        )
        sent = await read_topic(kafka, topic, until=3, key_of=None)
        garbled, foreign, readable = sorted(sent)
        error = {"error": "no such model", "code": "unknown_model", "id": readable}
        answers = {
            garbled: (b"\x93 not a response", MSGPACK),
            foreign: (b"<result/>", "application/xml"),
            readable: (msgspec.msgpack.encode(error), MSGPACK),
        }
        producer = AIOKafkaProducer(bootstrap_servers=kafka)
        await producer.start()
        try:
            for request_id, (body, content_type) in answers.items():
                status = b"error" if request_id == readable else b"ok"
                fields = [
                    (headers.REQUEST_ID, request_id.encode()),
                    (headers.STATUS, status),
                    (headers.CONTENT_TYPE, content_type.encode()),
                ]
                await producer.send_and_wait(client.reply_topic, body, headers=fields)
        finally:
            await producer.stop()
        results = await call
    assert time.monotonic() - started < 20  # answered, not timed out
    by_id = {result.request_id: result for result in results}
    assert set(by_id) == {garbled, foreign, readable}
    for request_id in (garbled, foreign):
        assert isinstance(by_id[request_id], PredictionError)
        assert by_id[request_id].code == ErrorCode.BAD_ENCODING
        assert request_id in by_id[request_id].message
    assert by_id[foreign].message.endswith("unknown content type 'application/xml'")
    assert by_id[readable].code == ErrorCode.UNKNOWN_MODEL


async def test_a_reply_reader_that_ended_is_replaced_by_the_next_call(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Any]
) -> None:
    """A reader ends on an error it cannot read past (no right to read the topic, say):
    the next call starts another rather than wait out its timeout."""
    settings = make_settings(kafka, model_root, None)
    await run_worker(settings)
    topic = settings.worker.topic_prefix + "mlp"
    x = {"x": np.ones((1, 32), np.float32)}
    async with SurgeClient(kafka) as client:
        await client.predict("mlp", x, topic=topic, timeout=30)
        assert client._replies is not None
        await client._replies.stop()  # its reader ends, as on such an error
        started = time.monotonic()
        await client.predict("mlp", x, topic=topic, timeout=20)
        assert time.monotonic() - started < 10


async def test_a_call_waiting_as_its_reader_ends_reads_what_came_meanwhile(kafka: str) -> None:
    """The reader is started again where it stopped, not at the topic's end: the result
    written while none ran is read, rather than the caller waiting out its timeout."""
    topic = f"surge.requests.reader-{uuid.uuid4().hex[:8]}"
    await create_topics(kafka, topic)
    x = {"x": np.ones((1, 4), np.float32)}
    async with SurgeClient(kafka) as client:
        started = time.monotonic()
        call = asyncio.create_task(client.predict("mlp", x, topic=topic, timeout=15))
        (request_id,) = await read_topic(kafka, topic, until=1, key_of=None)
        assert client._replies is not None
        await client._replies.stop()  # its reader ends, as on an error reading the topic
        error = {"error": "no such model", "code": "unknown_model", "id": request_id}
        fields = [
            (headers.REQUEST_ID, request_id.encode()),
            (headers.STATUS, b"error"),
            (headers.CONTENT_TYPE, MSGPACK.encode()),
        ]
        producer = AIOKafkaProducer(bootstrap_servers=kafka)
        await producer.start()
        try:
            await producer.send_and_wait(
                client.reply_topic, msgspec.msgpack.encode(error), headers=fields
            )
        finally:
            await producer.stop()
        with pytest.raises(PredictionError, match="no such model"):
            await call
    assert time.monotonic() - started < 10


def test_a_reader_started_again_goes_on_where_the_last_stopped_only_while_it_helps() -> None:
    """From where it stopped while a call that waited then still waits; from the end once
    no one does (a named topic may hold hours of others' results since), or once a reader
    stopped at the same place before (a record no reader gets past)."""
    client = SurgeClient()  # never started: its bookkeeping only
    client._read_to = {0: 5, 1: 9}
    client._waiting = {"a": asyncio.Future, "b": asyncio.Future}  # type: ignore[dict-item]
    client._orphans = {"a"}
    assert client._resume_from() == {0: 5, 1: 9}
    client._resumed = {0: 5, 1: 9}  # a reader started there, and stopped there again
    assert client._resume_from() == {}  # stopped at the same place again: skipped
    client._read_to = {0: 6, 1: 9}
    assert client._resume_from() == {0: 6, 1: 9}
    client._orphans = {"gone"}
    assert client._resume_from() == {}


async def test_a_reader_whose_start_failed_is_started_where_the_last_one_stopped() -> None:
    """A start cut short (the broker away, or the deadline of the call making it) leaves
    the next call to start one from the same place, not from the topic's end."""
    client = SurgeClient()  # never started: its bookkeeping only
    client._read_to = {0: 5, 1: 9}
    client._waiting = {"a": asyncio.Future()}
    client._orphans = {"a"}
    ended = asyncio.create_task(asyncio.sleep(0))
    await ended
    client._replies_reader = ended  # a reader ran, and ended
    starts: list[dict[int, int]] = []

    async def start(resume: dict[int, int]) -> None:
        starts.append(resume)
        if len(starts) == 1:
            raise KafkaConnectionError("the broker is away")
        client._replies = object()  # type: ignore[assignment]

    client._start_reply_topic = start  # type: ignore[method-assign]
    with pytest.raises(KafkaConnectionError):
        await client._reply_channel("kafka")
    await client._reply_channel("kafka")
    assert starts == [{0: 5, 1: 9}, {0: 5, 1: 9}]
    assert client._resumed == {0: 5, 1: 9}
