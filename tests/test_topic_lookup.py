"""Results for a topic the worker's producer holds no metadata for are looked up by a client of
its own. When the cluster cannot be reached for that, the result is retried (and dead-lettered
past `reply_retry_s`), never dropped, and the next lookup connects again."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from surge.schemas import ErrorCode, headers
from surge.workers.acked import AckedWrites
from surge.workers.ledger import Ledger
from surge.workers.writes import RetryPolicy, TopicLookup, Write
from tests.helpers import create_topics, make_ticket, read_topic
from tests.services import free_port

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def _forwarding(port: int, bootstrap: str) -> AsyncIterator[None]:
    """Connections to `port` forwarded to the broker: a bootstrap address that comes and goes
    (the broker advertises its own, so clients that bootstrapped through it go direct)."""
    host, _, target = bootstrap.rpartition(":")

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(target))
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    server = await asyncio.start_server(forward, "127.0.0.1", port)
    try:
        yield
    finally:
        server.close()


async def test_the_lookup_connects_again_after_the_cluster_could_not_be_reached(
    kafka: str,
) -> None:
    topic, port = f"test.lookup.{uuid.uuid4().hex[:8]}", free_port()
    await create_topics(kafka, topic)
    lookup = TopicLookup({"bootstrap_servers": f"127.0.0.1:{port}"}, wait_s=5)
    try:
        with pytest.raises(KafkaError):
            await lookup.exists(topic)  # nothing listens there yet
        async with _forwarding(port, kafka):
            assert await lookup.exists(topic)
    finally:
        await lookup.close()


async def test_a_result_whose_topic_cannot_be_looked_up_is_retried_then_dead_lettered(
    kafka: str,
) -> None:
    run = uuid.uuid4().hex[:8]
    dead_letters = f"test.dlq.{run}"
    await create_topics(kafka, dead_letters)
    producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all", enable_idempotence=True)
    await producer.start()
    await producer.partitions_for(dead_letters)  # known: dead letters need no lookup
    crashes: list[BaseException] = []
    ledger = Ledger(100, 1 << 20)
    lookup = TopicLookup({"bootstrap_servers": f"127.0.0.1:{free_port()}"}, wait_s=5)
    acked = AckedWrites(
        producer, ledger, RetryPolicy(dead_letters, 0.5, crashes.append), crashes.append, lookup
    )
    ticket = make_ticket(b"{}")
    ticket.request_id, ticket.key = run, run.encode()
    try:
        acked.start()
        ledger.admit(ticket)
        acked.put(Write(ticket, f"test.unseen.{run}", b"result", [], dead_letter=False))
        async with asyncio.timeout(30):
            while not ticket.settled:
                await ledger.progress()
    finally:
        await acked.close()
        await producer.stop()
    assert not crashes
    (letter,) = (await read_topic(kafka, dead_letters, until=1, key_of=None))[run]
    assert letter.headers[headers.ERROR_CODE] == ErrorCode.REPLY_FAILED.encode()
