"""A caller of `predict` stops waiting when it should: at once when the client closes or there
is nothing to wait for, and at its timeout whatever Redis does meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
import uuid
from typing import Any

import numpy as np
import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from surge.producers import SurgeClient, SyncClient
from surge.producers.client import ClientClosed
from tests.helpers import create_topics
from tests.services import RedisServer

pytestmark = pytest.mark.integration

X = {"x": np.ones((1, 32), np.float32)}


async def _unserved_topic(kafka: str) -> str:
    """A request topic no worker reads: every request to it waits until its timeout."""
    topic = f"test.{uuid.uuid4().hex[:8]}.requests.nobody"
    await create_topics(kafka, topic, partitions=1)
    return topic


@pytest.mark.parametrize("via", ["kafka", "redis"])
async def test_close_fails_the_callers_still_waiting_at_once(
    kafka: str, redis_url: str, via: str
) -> None:
    topic = await _unserved_topic(kafka)
    name = f"test-close-{uuid.uuid4().hex[:8]}"
    client = SurgeClient(kafka, redis_url=redis_url, redis_options={"client_name": name})
    await client.start()
    waiting = asyncio.create_task(
        client.predict("nobody", X, timeout=30, via=via, topic=topic)  # type: ignore[arg-type]
    )
    await asyncio.sleep(1)
    closing = asyncio.create_task(client.close())
    try:
        with pytest.raises(ClientClosed, match="closed"):
            await asyncio.wait_for(waiting, 2)
    finally:
        await closing
    await asyncio.sleep(0.2)  # anything the caller's clean-up did has reached Redis
    admin = Redis.from_url(redis_url)
    try:
        assert [c for c in await admin.client_list() if c["name"] == name] == []
    finally:
        await admin.aclose()


async def test_a_paused_redis_does_not_keep_a_caller_past_its_timeout(kafka: str) -> None:
    topic = await _unserved_topic(kafka)
    with RedisServer() as server:
        admin = Redis.from_url(server.url)
        async with SurgeClient(kafka, redis_url=server.url) as client:
            started = time.monotonic()
            waiting = asyncio.create_task(
                client.predict("nobody", X, timeout=1, via="redis", topic=topic)
            )
            await asyncio.sleep(0.5)  # subscribed and sent: the caller waits for its result
            await admin.execute_command("CLIENT", "PAUSE", "4000", "ALL")
            with pytest.raises(TimeoutError):
                await waiting
            assert time.monotonic() - started < 2
        await admin.aclose()


async def test_a_caller_whose_redis_connection_was_dropped_meanwhile_times_out(
    kafka: str,
) -> None:
    topic = await _unserved_topic(kafka)
    with RedisServer() as server:
        # No retries: the reader dies with its connection, and the next call rebuilds it.
        options = {"retry": Retry(NoBackoff(), 0)}
        async with SurgeClient(kafka, redis_url=server.url, redis_options=options) as client:
            waiting = asyncio.create_task(
                client.predict("nobody", X, timeout=2, via="redis", topic=topic)
            )
            await asyncio.sleep(0.5)
            await asyncio.to_thread(server.stop)
            await asyncio.sleep(0.2)  # the reader sees the connection go
            with pytest.raises(RedisConnectionError):
                await client.predict("nobody", X, timeout=1, via="redis", topic=topic)
            with pytest.raises(TimeoutError):
                await waiting


async def test_predict_many_with_nothing_to_send_returns_at_once(kafka: str) -> None:
    with SyncClient(kafka) as client:
        assert client.predict_many("mlp", []) == []
        assert client.predict_many("mlp", [], via="redis") == []  # no redis_url needed either


async def test_close_fails_a_caller_still_sending_at_once(strict_kafka: str) -> None:
    """A request topic missing on a cluster that does not create topics: the send waits for
    its metadata, and close() must not leave the caller waiting until its timeout."""
    client = SurgeClient(strict_kafka)
    await client.start()
    topic = f"test.missing.{uuid.uuid4().hex[:8]}"
    sending = asyncio.create_task(client.predict("nobody", X, timeout=30, topic=topic))
    await asyncio.sleep(1)
    await client.close()
    with pytest.raises(ClientClosed, match="closed"):
        await asyncio.wait_for(sending, 2)
    await client.close()  # closing again does nothing


def test_a_sync_client_closed_from_another_thread_fails_its_callers_at_once(
    strict_kafka: str,
) -> None:
    client = SyncClient(strict_kafka)
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            client.predict("nobody", X, timeout=30, topic=f"test.missing.{uuid.uuid4().hex[:8]}")
        except BaseException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(1)
    started = time.monotonic()
    client.close()
    caller.join(5)
    assert not caller.is_alive(), "the caller was left blocked"
    assert [type(exc) for exc in outcome] == [ClientClosed]
    assert time.monotonic() - started < 5
    with pytest.raises(ClientClosed):
        client.predict("nobody", X, timeout=1)
    client.close()  # again: nothing


def test_a_sync_call_starting_as_the_client_closes_fails_at_once(
    kafka: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call that has passed the closed check but not handed its coroutine over yet, when
    another thread closes the client: it is failed with the others, not stranded on a
    stopped loop."""
    client = SyncClient(kafka)
    handing_over = threading.Event()
    submit = asyncio.run_coroutine_threadsafe

    def slow_submit(coroutine: Any, loop: asyncio.AbstractEventLoop) -> Any:
        if threading.current_thread().name == "caller":
            handing_over.set()
            time.sleep(0.5)  # close() runs meanwhile
        return submit(coroutine, loop)

    monkeypatch.setattr("surge.producers.sync.asyncio.run_coroutine_threadsafe", slow_submit)
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            client.predict("nobody", X, timeout=5, topic=f"test.{uuid.uuid4().hex[:8]}")
        except BaseException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call, name="caller")
    caller.start()
    assert handing_over.wait(5)
    client.close()
    caller.join(10)
    assert not caller.is_alive(), "the caller was left blocked"
    assert [type(exc) for exc in outcome] == [ClientClosed]


def test_a_sync_call_interrupted_stops_on_the_clients_loop_too(kafka: str) -> None:
    """Ctrl-C in a waiting caller: its request stops waiting on the client's loop as well,
    rather than hold its subscription and its place until its timeout."""
    topic = asyncio.run(_unserved_topic(kafka))
    with SyncClient(kafka) as client:
        interrupt = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))  # Ctrl-C
        interrupt.start()
        with pytest.raises(KeyboardInterrupt):
            client.predict("nobody", X, timeout=30, topic=topic)
        interrupt.join()
        deadline = time.monotonic() + 5
        while client._client._waiting and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not client._client._waiting, "the call still waits on the client's loop"


async def test_a_redis_rebuild_cut_short_still_closes_both_connections(kafka: str) -> None:
    """A caller's deadline falling while the old subscription closes: the client behind it
    is closed all the same, not left open with nothing referring to it."""
    with RedisServer() as server:
        admin = Redis.from_url(server.url)
        try:
            async with SurgeClient(kafka, redis_url=server.url) as client:
                await client._reply_channel("redis")
                assert client._redis is not None
                assert client._pubsub is not None
                await client._redis.ping()  # the client's own connection, beside the pub/sub
                close_subscription = client._pubsub.aclose

                async def slow_close() -> None:
                    await asyncio.sleep(0.3)  # a connection slow to go
                    await close_subscription()

                client._pubsub.aclose = slow_close  # type: ignore[method-assign]
                stopping = asyncio.create_task(client._stop_redis())
                await asyncio.sleep(0.1)
                stopping.cancel()  # the deadline of the call rebuilding it
                await asyncio.gather(stopping, return_exceptions=True)
                await asyncio.sleep(1)
                names = [c.get("cmd") for c in await admin.client_list()]
                assert len(names) == 1, names  # the admin connection alone
        finally:
            await admin.aclose()


async def test_a_redis_that_never_answers_holds_up_no_call_answered_through_kafka(
    kafka: str,
) -> None:
    """Connecting to Redis and starting the reply topic's reader are set up apart: a call
    via Kafka goes on while another waits on a Redis that accepts and says nothing."""
    silent = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    hanging = {"socket_connect_timeout": 120, "socket_timeout": 120}  # past the bound below
    url = f"redis://127.0.0.1:{port}/0"
    async with SurgeClient(kafka, redis_url=url, redis_options=hanging) as client:
        connecting = asyncio.ensure_future(client._reply_channel("redis"))
        await asyncio.sleep(0.2)
        assert not connecting.done()
        topic = await asyncio.wait_for(client._reply_channel("kafka"), 30)
        assert topic == client.reply_topic
        connecting.cancel()
        with contextlib.suppress(BaseException):
            await connecting
    silent.close()
