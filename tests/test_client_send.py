"""Sending requests: a request Kafka refuses for good fails alone, and later requests to its
partition still go out; a batch with an input no worker would take sends nothing; a closed
client refuses calls, and closing ends a send under way."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import numpy as np
import pytest
from aiokafka.errors import MessageSizeTooLargeError, ProducerClosed

from surge.producers import ClientClosed, SurgeClient
from surge.schemas import TensorError
from tests.helpers import create_topics, read_to_end, read_topic

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


async def test_close_waits_for_the_producer_a_refusal_replaced(kafka: str) -> None:
    """The producer replaced after a refusal stops in the background (its records in flight
    go out first): a close meanwhile waits for that stop rather than leave it pending."""
    topic = f"test.small.{uuid.uuid4().hex[:8]}"
    await create_topics(kafka, topic, partitions=1, configs={"max.message.bytes": "3000"})
    client = SurgeClient(kafka)
    await client.start()
    try:
        replaced = client._producer
        assert replaced is not None
        flush = replaced.stop

        async def slow_stop() -> None:  # as a stop that has records in flight to flush
            await asyncio.sleep(1)
            await flush()

        replaced.stop = slow_stop  # type: ignore[method-assign]
        with pytest.raises(MessageSizeTooLargeError):
            await client.submit("mlp", {"x": np.ones((1, 2000), np.float32)}, topic=topic)
        async with asyncio.timeout(30):
            while client._producer is replaced:  # the new one in place, the old one stopping
                await asyncio.sleep(0)
    finally:
        await client.close()
    pending = [t for t in asyncio.all_tasks() if "_renew_producer" in repr(t.get_coro())]
    assert pending == []


async def test_a_batch_with_an_input_no_worker_would_take_sends_none_of_it(kafka: str) -> None:
    """Refused before anything goes out: no request of the batch is computed for nobody."""
    topic = f"test.mixed.{uuid.uuid4().hex[:8]}"
    await create_topics(kafka, topic, partitions=1)
    good = {"x": np.ones((1, 8), np.float32)}
    bad = {"x": np.array([[1, 2]], dtype=object)}  # objects hold strings or bytes
    async with SurgeClient(kafka) as client:
        with pytest.raises(TensorError, match="holds strings or bytes"):
            await client.predict_many("mlp", [good, bad], topic=topic, return_exceptions=True)
        await client.submit("mlp", good, topic=topic)  # a marker: what came before it
    assert len(await read_to_end(kafka, topic, key_of=None)) == 1


async def test_calls_after_close_say_the_client_is_closed(kafka: str) -> None:
    client = SurgeClient(kafka)
    await client.start()
    await client.close()
    x = {"x": np.ones((1, 8), np.float32)}
    with pytest.raises(ClientClosed):
        await client.predict_many("mlp", [x], timeout=5, return_exceptions=True)
    with pytest.raises(ClientClosed):
        await client.submit("mlp", x)


async def test_close_ends_a_submit_waiting_for_a_topic_that_does_not_exist(
    strict_kafka: str,
) -> None:
    """The cluster creates no topics: the send waits for metadata that never comes."""
    x = {"x": np.ones((1, 8), np.float32)}
    async with SurgeClient(strict_kafka) as client:
        submit = asyncio.create_task(
            client.submit("mlp", x, topic=f"test.missing.{uuid.uuid4().hex[:8]}")
        )
        await asyncio.sleep(1.0)
        assert not submit.done()
        started = time.monotonic()
        await client.close()
        with pytest.raises(ClientClosed):
            await submit
        assert time.monotonic() - started < 3


async def test_a_call_that_times_out_before_its_requests_are_sent_says_so(
    strict_kafka: str,
) -> None:
    """A request topic missing on a cluster that does not create topics: the send waits for
    its metadata until the deadline. The timeout says the requests never went out, rather
    than that no result came."""
    topic = f"test.missing.{uuid.uuid4().hex[:8]}"
    x = {"x": np.ones((1, 8), np.float32)}
    async with SurgeClient(strict_kafka) as client:
        with pytest.raises(TimeoutError, match=r"timed out after 1s sending: 0 of 2 requests sent"):
            await client.predict_many("mlp", [x, x], timeout=1, topic=topic)
        results = await client.predict_many(
            "mlp", [x, x], timeout=1, topic=topic, return_exceptions=True
        )
    assert [type(r) for r in results] == [TimeoutError, TimeoutError]
    assert all("(not sent: timed out sending)" in str(r) for r in results)


class _Producer:
    """A producer's `send` alone: records what it took, or is closed under a waiting send."""

    def __init__(self, client: SurgeClient | None = None, successor: Any = None) -> None:
        self.sent: list[bytes] = []
        self._client, self._successor = client, successor

    async def send(self, **record: Any) -> asyncio.Future[Any]:
        if self._client is not None:  # replaced while this send waited, then closed
            self._client._producer = self._successor
            raise ProducerClosed()
        self.sent.append(record["value"])
        return asyncio.get_running_loop().create_future()


@pytest.mark.parametrize("replaced", [True, False])
async def test_a_send_whose_producer_was_replaced_meanwhile_goes_on_the_new_one(
    replaced: bool,
) -> None:
    client = SurgeClient()  # never started: its send alone
    fresh = _Producer()
    old = _Producer(client)
    old._successor = fresh if replaced else old  # not replaced: closed, as by close()
    client._producer = old  # type: ignore[assignment]
    if not replaced:
        with pytest.raises(ProducerClosed):
            await client._send("mlp", b"body", None, "r-1", None, None, None)
        return
    await client._send("mlp", b"body", None, "r-1", None, None, None)
    assert fresh.sent == [b"body"]


async def test_a_client_whose_producer_takes_larger_records_sends_them(kafka: str) -> None:
    """`max_request_size` goes to the producer alone: the reply reader and the admin
    client would refuse it."""
    topic = f"test.large.{uuid.uuid4().hex[:8]}"
    await create_topics(kafka, topic, partitions=1, configs={"max.message.bytes": str(8 << 20)})
    large = {"x": np.ones((1, 500_000), np.float32)}  # 2 MB: over the default 1 MiB
    options = {"max_request_size": 8 << 20}
    async with SurgeClient(kafka, kafka_options=options) as client:
        (result,) = await client.predict_many(
            "mlp", [large], topic=topic, timeout=2, return_exceptions=True
        )
    assert isinstance(result, TimeoutError)  # sent, and never answered: no worker reads it
    assert "not sent" not in str(result)
    assert len(await read_topic(kafka, topic, until=1, key_of=None)) == 1
