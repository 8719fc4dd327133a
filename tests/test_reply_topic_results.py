"""Results on the client's reply topic: one it cannot read is its caller's error result, at
once, and the results read beside it are kept."""

from __future__ import annotations

import asyncio
import time
import uuid

import msgspec
import numpy as np
import pytest
from aiokafka import AIOKafkaProducer

from surge.producers import PredictionError, SurgeClient
from surge.schemas import MSGPACK, ErrorCode, headers
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
