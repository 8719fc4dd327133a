"""Sending requests: a request Kafka refuses for good fails alone, and later requests to its
partition still go out."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from aiokafka.errors import MessageSizeTooLargeError

from surge.producers import SurgeClient
from tests.helpers import create_topics, read_topic

pytestmark = pytest.mark.integration


async def test_a_request_over_the_topic_limit_leaves_later_ones_to_its_partition_sent(
    kafka: str,
) -> None:
    """aiokafka's idempotent producer keeps the sequence numbers of the refused batch: without
    a new producer every later request to that partition fails as out of order."""
    topic = f"test.small.{uuid.uuid4().hex[:8]}"
    await create_topics(kafka, topic, partitions=1, configs={"max.message.bytes": "3000"})
    small = {"x": np.ones((1, 8), np.float32)}
    async with SurgeClient(kafka) as client:
        sent = [await client.submit("mlp", small, topic=topic) for _ in range(3)]
        with pytest.raises(MessageSizeTooLargeError):
            await client.submit("mlp", {"x": np.ones((1, 2000), np.float32)}, topic=topic)
        sent += [await client.submit("mlp", small, topic=topic) for _ in range(3)]
    assert len(await read_topic(kafka, topic, until=6, key_of=None)) == 6
    assert len(sent) == 6
