"""Results for a topic the worker's producer holds no metadata for are looked up by a client of
its own. When the cluster cannot be reached for that, the result is retried (and dead-lettered
past `reply_retry_s`), never dropped, and the next lookup connects again."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from surge.config import Settings
from surge.producers import SurgeClient
from surge.schemas import ErrorCode, headers
from surge.workers import writes
from surge.workers.acked import AckedWrites
from surge.workers.ledger import Ledger
from surge.workers.writes import RetryPolicy, TopicLookup, Write
from tests.conftest import make_settings
from tests.helpers import create_topics, make_ticket, read_topic
from tests.services import KafkaBroker, free_port

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


async def test_a_burst_of_lookups_starts_one_client(
    kafka: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[AIOKafkaProducer] = []

    class Counted(AIOKafkaProducer):
        async def start(self) -> None:
            started.append(self)
            await super().start()

    monkeypatch.setattr(writes, "AIOKafkaProducer", Counted)
    topic = f"test.lookup.{uuid.uuid4().hex[:8]}"
    await create_topics(kafka, topic)
    lookup = TopicLookup({"bootstrap_servers": kafka}, wait_s=5)
    try:
        assert all(await asyncio.gather(*(lookup.exists(topic) for _ in range(20))))
    finally:
        await lookup.close()
    assert len(started) == 1


async def test_a_cluster_gone_quiet_is_no_answer_that_a_topic_is_missing() -> None:
    """Started, then cut off: a lookup that gets no metadata raises (the result is retried),
    where a cluster that answers without the topic means it does not exist."""
    broker = KafkaBroker().start()
    lookup = TopicLookup({"bootstrap_servers": broker.bootstrap}, wait_s=1)
    try:
        topic = f"test.lookup.{uuid.uuid4().hex[:8]}"
        await create_topics(broker.bootstrap, topic)
        assert await lookup.exists(topic)
        broker.close()
        with pytest.raises(KafkaError):
            await lookup.exists(f"test.other.{uuid.uuid4().hex[:8]}")
    finally:
        await lookup.close()
        broker.close()


async def test_results_a_topic_takes_one_by_one_are_not_refused_for_their_batch(
    kafka: str,
) -> None:
    """Over a reply topic's max.message.bytes together, each result alone fits it."""
    run = uuid.uuid4().hex[:8]
    topic, dead_letters = f"test.small.{run}", f"test.dlq.{run}"
    await create_topics(kafka, topic, partitions=1, configs={"max.message.bytes": "20000"})
    await create_topics(kafka, dead_letters)
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka, acks="all", enable_idempotence=True, max_batch_size=256 * 1024
    )
    await producer.start()
    await producer.partitions_for(topic)
    ledger = Ledger(1000, 1 << 30)
    crashes: list[BaseException] = []
    acked = AckedWrites(
        producer,
        ledger,
        RetryPolicy(dead_letters, 60, crashes.append),
        crashes.append,
        TopicLookup({"bootstrap_servers": kafka}, 5),
    )
    tickets = []
    try:
        acked.start()
        for i in range(100):
            ticket = make_ticket(b"{}")
            ticket.offset, ticket.request_id = i, f"{run}-{i}"
            ticket.key = ticket.request_id.encode()
            ledger.admit(ticket)
            tickets.append(ticket)
            acked.put(Write(ticket, topic, b"x" * 1000, [], dead_letter=False))
        async with asyncio.timeout(30):
            while not all(t.settled for t in tickets):
                await ledger.progress()
    finally:
        await acked.close()
        await producer.stop()
    assert not crashes
    assert len(await read_topic(kafka, topic, until=100, key_of=None)) == 100  # no dead letter


async def test_a_result_its_topic_refuses_leaves_later_results_to_that_partition_written(
    kafka: str,
) -> None:
    """The idempotent producer keeps the sequence numbers of a batch refused for good, and
    every later batch to its partition would fail as out of order (and be dead-lettered):
    a new producer takes over."""
    run = uuid.uuid4().hex[:8]
    topic, dead_letters = f"test.small.{run}", f"test.dlq.{run}"
    await create_topics(kafka, topic, partitions=1, configs={"max.message.bytes": "20000"})
    await create_topics(kafka, dead_letters)
    options = {"bootstrap_servers": kafka, "acks": "all", "enable_idempotence": True}

    async def new_producer() -> AIOKafkaProducer:
        producer = AIOKafkaProducer(**options)
        await producer.start()
        return producer

    acked_producer = await new_producer()
    ledger = Ledger(1000, 1 << 30)
    crashes: list[BaseException] = []
    acked = AckedWrites(
        acked_producer,
        ledger,
        RetryPolicy(dead_letters, 30, crashes.append),
        crashes.append,
        TopicLookup({"bootstrap_servers": kafka}, 5),
        new_producer,
    )

    async def write(offset: int, size: int) -> None:
        ticket = make_ticket(b"{}")
        ticket.offset, ticket.request_id = offset, f"{run}-{offset}"
        ticket.key = ticket.request_id.encode()
        ledger.admit(ticket)
        acked.put(Write(ticket, topic, b"x" * size, [], dead_letter=False))
        async with asyncio.timeout(30):
            while not ticket.settled:
                await ledger.progress()

    acked.start()
    try:
        for offset in range(3):
            await write(offset, 1000)
        await write(3, 30_000)  # over the topic's limit: a dead letter
        for offset in range(4, 7):
            await write(offset, 1000)
    finally:
        await acked.close()
        await acked.producer.stop()
    assert not crashes
    written = await read_topic(kafka, topic, until=6, key_of=None)
    assert len(written) == 6
    letters = await read_topic(kafka, dead_letters, until=1, key_of=None)
    assert [v[0].headers[headers.ERROR_CODE] for v in letters.values()] == [b"reply_failed"]


def test_topics_not_used_lately_are_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writes, "METADATA_MAX_IDLE_S", 0.05)
    recent = writes.RecentTopics()
    assert recent.forget_idle() is None  # nothing used: nothing forgotten
    recent.used(["a", "b"])
    assert recent.forget_idle() is None  # all in use
    time.sleep(0.06)
    recent.used(["b", "c"])
    assert recent.forget_idle() == {"b", "c"}
    assert "a" not in recent
    time.sleep(0.06)
    assert recent.forget_idle() == set()
    assert recent.forget_idle() is None


async def test_a_client_s_deleted_reply_topic_stays_deleted_once_the_worker_forgets_it(
    kafka: str,
    model_root: Path,
    run_worker: Callable[[Settings], Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each client makes a reply topic and deletes it as it closes. A worker's producer that
    kept asking about it would bring it back at its next metadata refresh, on a cluster
    that creates topics on demand (Kafka's default)."""
    monkeypatch.setattr(writes, "METADATA_MAX_IDLE_S", 1.0)  # forgotten after 1 s, checked at 0.2
    settings = make_settings(kafka, model_root, None)
    topic = settings.worker.topic_prefix + "mlp"
    await create_topics(kafka, topic)
    worker = await run_worker(settings)
    x = {"x": np.ones((1, 32), np.float32)}
    gone = []
    for _ in range(3):
        async with SurgeClient(kafka, topic_prefix=settings.worker.topic_prefix) as client:
            await client.predict("mlp", x, timeout=30)
            gone.append(client.reply_topic)
        await asyncio.sleep(1.5)  # idle long enough to be forgotten
    assert worker._acked is not None
    await worker._acked.producer.client.force_metadata_update()
    await asyncio.sleep(0.5)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        assert set(gone).isdisjoint(await admin.list_topics())
    finally:
        await admin.close()
