"""Results to Redis, on a real redis-server: many results per script call, the first result of
an id kept and announced once, calls split by size, an unavailable Redis waited for and a
result Redis refuses dead-lettered."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import msgspec
import numpy as np
import pytest
from aiokafka.errors import MessageSizeTooLargeError
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from structlog.testing import capture_logs

from surge.config import Settings
from surge.producers import (
    Prediction,
    PredictionError,
    SurgeClient,
    request_body,
    request_headers,
)
from surge.schemas import MSGPACK, ErrorCode, headers
from surge.workers.ledger import Ledger
from surge.workers.replies import Replies, _chunks_by_size
from tests.conftest import make_settings
from tests.helpers import (
    committed_lag,
    create_topics,
    make_ticket,
    publish,
    read_redis,
    read_topic,
    wait_committed,
)
from tests.services import RedisServer


def _items(sizes: list[int]) -> list[tuple[Any, bytes]]:
    return [(SimpleNamespace(request_id=f"r{i}"), bytes(size)) for i, size in enumerate(sizes)]


def test_chunks_keep_order_and_stay_under_the_limit() -> None:
    items = _items([40, 40, 30, 100, 10, 10])
    chunks = list(_chunks_by_size(items, 100))
    assert [[t.request_id for t, _ in chunk] for chunk in chunks] == [
        ["r0", "r1"],
        ["r2"],
        ["r3"],  # over the limit alone: a call of its own
        ["r4", "r5"],
    ]


def _replies(
    redis: Redis, prefix: str, *, min_replicas: int = 0, timeout_s: float = 5.0
) -> Replies:
    return Replies(
        lambda _: None,
        redis,
        Ledger(10_000, 1 << 30),
        dead_letter_topic="unused",
        redis_ttl_s=60,
        redis_prefix=prefix,
        on_crash=lambda exc: None,
        redis_min_replicas=min_replicas,
        redis_timeout_s=timeout_s,
    )


async def _restricted_user(redis_url: str, keys: str, channels: str = "*") -> tuple[str, str]:
    """A Redis user that may write only keys matching `keys` and publish only to channels
    matching `channels`: (name, password)."""
    name, password = f"u{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    admin = Redis.from_url(redis_url)
    try:
        await admin.execute_command(
            "ACL", "SETUSER", name, "on", f">{password}", f"~{keys}", f"&{channels}", "+@all"
        )
    finally:
        await admin.aclose()
    return name, password


@pytest.mark.integration
async def test_a_call_of_many_results_keeps_the_first_of_each_id_and_announces_it_once(
    redis_url: str,
) -> None:
    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    redis = Redis.from_url(redis_url)
    replies = _replies(redis, prefix)
    listener = Redis.from_url(redis_url)
    pubsub = listener.pubsub()
    await pubsub.psubscribe(prefix + "*")
    await pubsub.get_message(timeout=5)  # the confirmation
    try:
        first = [(SimpleNamespace(request_id=f"r{i}"), b"first-%d" % i) for i in range(700)]
        # A redelivered request's second result, for half of the ids.
        again = [(SimpleNamespace(request_id=f"r{i}"), b"again") for i in range(0, 700, 2)]
        await replies._write_redis(first)  # type: ignore[arg-type]
        await replies._write_redis(again)  # type: ignore[arg-type]

        stored = await redis.mget([f"{prefix}r{i}" for i in range(700)])
        assert stored == [b"first-%d" % i for i in range(700)]
        assert 55 <= await redis.ttl(f"{prefix}r0") <= 60
        announced: list[bytes] = []
        while (message := await pubsub.get_message(timeout=0.5)) is not None:
            if message["type"] == "pmessage":
                announced.append(message["data"])
        assert announced == [b"first-%d" % i for i in range(700)]
    finally:
        await pubsub.aclose()
        await asyncio.gather(listener.aclose(), redis.aclose())


@pytest.mark.integration
async def test_results_redis_refuses_come_back_and_the_others_of_their_call_are_stored(
    redis_url: str,
) -> None:
    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    user, password = await _restricted_user(redis_url, prefix + "ok-*")
    redis = Redis.from_url(redis_url, username=user, password=password)
    items = [
        (SimpleNamespace(request_id=f"{'no' if i % 50 == 7 else 'ok'}-{i}"), b"%d" % i)
        for i in range(300)
    ]
    try:
        refused = await _replies(redis, prefix)._write_redis(items)  # type: ignore[arg-type]
    finally:
        await redis.aclose()
    assert [ticket.request_id for ticket, _ in refused] == [f"no-{i}" for i in range(7, 300, 50)]
    assert all("permission" in str(exc) for _, exc in refused)
    stored = await read_redis(
        redis_url, [f"ok-{i}" for i in range(300) if i % 50 != 7], prefix=prefix
    )
    assert len(stored) == 294


@pytest.mark.integration
@pytest.mark.parametrize("results", [1, 5])
async def test_a_result_that_may_not_be_announced_is_not_stored_either(
    redis_url: str, results: int
) -> None:
    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    user, password = await _restricted_user(redis_url, prefix + "*", channels=prefix + "ok-*")
    redis = Redis.from_url(redis_url, username=user, password=password)
    listener = Redis.from_url(redis_url)
    pubsub = listener.pubsub()
    await pubsub.psubscribe(prefix + "*")
    await pubsub.get_message(timeout=5)  # the confirmation
    ids = [f"{'ok' if i % 2 else 'no'}-{i}" for i in range(results)]
    items = [(SimpleNamespace(request_id=i), i.encode()) for i in ids]
    try:
        refused = await _replies(redis, prefix)._write_redis(items)  # type: ignore[arg-type]
        assert [ticket.request_id for ticket, _ in refused] == [i for i in ids if "no" in i]
        assert all("channel" in str(exc) for _, exc in refused)
        stored = await redis.mget([prefix + i for i in ids])
        assert stored == [i.encode() if "ok" in i else None for i in ids]
        announced = []
        while (message := await pubsub.get_message(timeout=0.5)) is not None:
            if message["type"] == "pmessage":
                announced.append(message["data"])
        assert announced == [i.encode() for i in ids if "ok" in i]
    finally:
        await pubsub.aclose()
        await asyncio.gather(listener.aclose(), redis.aclose())


@pytest.mark.integration
async def test_a_full_redis_is_waited_for_not_refused() -> None:
    with RedisServer() as server:
        admin = Redis.from_url(server.url)
        redis = Redis.from_url(server.url)
        try:
            await admin.config_set("maxmemory", "1")  # and no eviction: every write refused
            items = [(SimpleNamespace(request_id=f"r{i}"), b"x") for i in range(10)]
            write = asyncio.ensure_future(_replies(redis, "full:")._write_redis(items))  # type: ignore[arg-type]
            await asyncio.sleep(0.5)
            assert not write.done()
            await admin.config_set("maxmemory", "0")
            assert await asyncio.wait_for(write, 10) == []
            assert len(await redis.keys("full:*")) == 10
        finally:
            await asyncio.gather(admin.aclose(), redis.aclose())


@pytest.mark.integration
async def test_results_are_answered_once_the_replicas_they_must_reach_have_them() -> None:
    """min_replicas: a result counts as stored once WAIT says enough replicas have it, so a
    failover loses none whose request was committed; until then it is tried again."""
    with RedisServer() as primary:
        replica = RedisServer(replica_of=primary).start()
        redis = Redis.from_url(primary.url, single_connection_client=True)
        replies = _replies(redis, "surge:result:", min_replicas=1, timeout_s=1.0)
        try:
            items = [(SimpleNamespace(request_id=f"r{i}"), b"x") for i in range(10)]
            async with asyncio.timeout(30):  # the replica's first sync included
                assert await replies._write_redis(items) == []  # type: ignore[arg-type]
            replica.close()
            later = [(SimpleNamespace(request_id=f"s{i}"), b"y") for i in range(10)]
            write = asyncio.ensure_future(replies._write_redis(later))  # type: ignore[arg-type]
            await asyncio.sleep(2)
            assert not write.done()  # stored on the primary, where no replica has it
            assert len(await read_redis(primary.url, [t.request_id for t, _ in later])) == 10
            replica = RedisServer(replica_of=primary).start()
            assert await asyncio.wait_for(write, 30) == []
            copy = Redis.from_url(replica.url)
            try:
                assert await copy.get("surge:result:s9") == b"y"
            finally:
                await copy.aclose()
        finally:
            await redis.aclose()
            replica.close()


async def test_a_redis_with_fewer_replicas_than_required_is_named_at_start() -> None:
    with RedisServer() as primary:
        replica = RedisServer(replica_of=primary).start()
        redis = Redis.from_url(primary.url, single_connection_client=True)
        try:
            async with asyncio.timeout(20):
                while (await redis.info("replication"))["connected_slaves"] < 1:
                    await asyncio.sleep(0.1)
            for min_replicas, warned in [(1, False), (2, True)]:
                replies = _replies(redis, "surge:result:", min_replicas=min_replicas)
                with capture_logs() as logs:
                    replies.start()
                    await asyncio.sleep(0.5)
                    await replies.close()
                short = [e for e in logs if e["event"] == "redis_short_of_replicas"]
                assert bool(short) == warned
            assert short[0]["replicas"] == 1
            assert short[0]["min_replicas"] == 2
        finally:
            await redis.aclose()
            replica.close()


@pytest.mark.integration
async def test_results_redis_cannot_take_yet_wait_when_replicas_are_required_too() -> None:
    """With min_replicas, a result Redis answers "try later" for (OOM here; READONLY or
    NOREPLICAS in a failover) is written again like the others, never counted as stored."""
    with RedisServer() as primary:
        replica = RedisServer(replica_of=primary).start()
        admin = Redis.from_url(primary.url)
        redis = Redis.from_url(primary.url, single_connection_client=True)
        replies = _replies(redis, "surge:result:", min_replicas=1, timeout_s=1.0)
        try:
            first = [(SimpleNamespace(request_id="r0"), b"x")]
            async with asyncio.timeout(30):  # the replica's first sync included
                assert await replies._write_redis(first) == []  # type: ignore[arg-type]
            await admin.config_set("maxmemory", "1")  # and no eviction: every SET refused
            items = [(SimpleNamespace(request_id=f"r{i}"), b"x") for i in range(10)]
            write = asyncio.ensure_future(replies._write_redis(items))  # type: ignore[arg-type]
            await asyncio.sleep(1)
            assert not write.done(), "settled results Redis never stored"
            await admin.config_set("maxmemory", "0")
            assert await asyncio.wait_for(write, 30) == []
            assert len(await read_redis(replica.url, [f"r{i}" for i in range(10)])) == 10
        finally:
            await asyncio.gather(redis.aclose(), admin.aclose())
            replica.close()


@pytest.mark.integration
async def test_a_wait_refused_leaves_the_results_stored_and_waiting_not_refused() -> None:
    """A WAIT that fails (an ACL without it, a proxy that lacks it) says nothing about the
    results, which are stored: they wait, and none becomes a dead letter."""
    with RedisServer() as primary:
        replica = RedisServer(replica_of=primary).start()
        user, password = await _restricted_user(primary.url, "surge:result:*")
        admin = Redis.from_url(primary.url)
        await admin.execute_command("ACL", "SETUSER", user, "-wait")
        redis = Redis.from_url(
            primary.url, username=user, password=password, single_connection_client=True
        )
        replies = _replies(redis, "surge:result:", min_replicas=1, timeout_s=1.0)
        try:
            items = [(SimpleNamespace(request_id=f"r{i}"), b"x") for i in range(20)]
            write = asyncio.ensure_future(replies._write_redis(items))  # type: ignore[arg-type]
            await asyncio.sleep(1.5)
            assert not write.done()
            assert len(await read_redis(primary.url, [f"r{i}" for i in range(20)])) == 20
            await admin.execute_command("ACL", "SETUSER", user, "+wait")
            assert await asyncio.wait_for(write, 30) == []  # none refused
        finally:
            await asyncio.gather(redis.aclose(), admin.aclose())
            replica.close()


@pytest.mark.integration
async def test_a_result_stored_before_on_another_connection_is_waited_for_too() -> None:
    """WAIT counts its own connection's writes only: a result stored by an earlier connection
    (before a reconnect) is written again on this one, so its WAIT covers it."""
    with RedisServer() as primary:
        replica = RedisServer(replica_of=primary, options=["--enable-debug-command", "yes"])
        replica.start()
        redis = Redis.from_url(primary.url, single_connection_client=True)
        earlier, lagging = Redis.from_url(primary.url), Redis.from_url(replica.url)
        replies = _replies(redis, "surge:result:", min_replicas=1, timeout_s=1.0)
        try:
            async with asyncio.timeout(30):  # the replica's first sync
                while await earlier.wait(1, 100) < 1:
                    await earlier.set("probe", b"")
            asleep = asyncio.ensure_future(lagging.execute_command("DEBUG", "SLEEP", "2"))
            await asyncio.sleep(0.2)  # the replica takes nothing in now
            await earlier.set("surge:result:r0", b"first")
            started = time.monotonic()
            item = (SimpleNamespace(request_id="r0"), b"again")
            assert await replies._write_redis([item]) == []  # type: ignore[list-item]
            assert time.monotonic() - started > 1  # answered once the replica woke
            await asleep
            assert await lagging.get("surge:result:r0") == b"first"
        finally:
            await asyncio.gather(redis.aclose(), earlier.aclose(), lagging.aclose())
            replica.close()


async def test_a_worker_commits_no_request_whose_result_a_replica_lacks(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Any]
) -> None:
    """End to end with `min_replicas = 1`: while the only replica is down, results are stored
    on the primary (or wait) but their requests stay uncommitted; once a replica is back, all
    are."""
    with RedisServer() as primary:
        replica = RedisServer(replica_of=primary).start()
        try:
            settings = make_settings(kafka, model_root, primary.url, SURGE_REDIS__MIN_REPLICAS="1")
            topic = settings.worker.topic_prefix + "mlp"
            group = settings.worker.group_id
            await create_topics(kafka, topic)
            await run_worker(settings)
            route = request_headers(
                model="mlp", content_type=MSGPACK, reply_to=headers.REPLY_TO_REDIS
            )
            x = {"x": np.ones((1, 32), np.float32)}

            async def send(ids: list[str]) -> None:
                records = [(topic, i.encode(), request_body(x, i, MSGPACK), route) for i in ids]
                await publish(kafka, records)

            first = [f"a{i}" for i in range(50)]
            await send(first)
            await wait_committed(kafka, group, topic, timeout=60)
            replica.close()
            second = [f"b{i}" for i in range(50)]
            await send(second)
            # Stored on the primary: the first write's results at least. A later write waits
            # behind that one's retries, so how many depends on how the batches fell.
            assert await read_redis(primary.url, second, timeout=10)
            await asyncio.sleep(2)
            assert await committed_lag(kafka, group, topic) == 50
            replica = RedisServer(replica_of=primary).start()
            await wait_committed(kafka, group, topic, timeout=60)
            assert len(await read_redis(replica.url, first + second, timeout=10)) == 100
        finally:
            replica.close()


@pytest.mark.integration
# `decode_responses` in a URL overrides a client's own: results are still read as bytes.
@pytest.mark.parametrize("url_options", ["", "?decode_responses=true"])
@pytest.mark.parametrize("refused", ["keys", "channels", "channels-not-deleted"])
async def test_a_worker_dead_letters_the_results_redis_refuses_and_goes_on(
    kafka: str,
    redis_url: str,
    model_root: Path,
    run_worker: Callable[[Settings], Any],
    url_options: str,
    refused: str,
) -> None:
    run = uuid.uuid4().hex[:8]
    prefix, dead_letters = f"test:{run}:", f"test.dlq.{run}"
    if refused == "keys":  # the whole call refused, then halved down to each result
        user, password = await _restricted_user(redis_url, prefix + "ok-*")
    else:  # the call runs, and reports each result it may not announce
        user, password = await _restricted_user(redis_url, prefix + "*", prefix + "ok-*")
    if refused == "channels-not-deleted":  # nor take back the result stored unannounced
        admin = Redis.from_url(redis_url)
        await admin.execute_command("ACL", "SETUSER", user, "-del")
        await admin.aclose()
    settings = make_settings(
        kafka,
        model_root,
        redis_url + url_options,
        SURGE_REDIS__USERNAME=user,
        SURGE_REDIS__PASSWORD=password,
        SURGE_REDIS__KEY_PREFIX=prefix,
        SURGE_WORKER__DEAD_LETTER_TOPIC=dead_letters,
    )
    topic = settings.worker.topic_prefix + "mlp"
    await create_topics(kafka, topic, dead_letters)
    await run_worker(settings)
    ids = [f"{'no' if i % 10 == 3 else 'ok'}-{run}-{i}" for i in range(200)]
    route = request_headers(model="mlp", content_type=MSGPACK, reply_to=headers.REPLY_TO_REDIS)
    x = {"x": np.ones((1, 32), np.float32)}
    await publish(kafka, [(topic, i.encode(), request_body(x, i, MSGPACK), route) for i in ids])

    stored = await read_redis(redis_url, [i for i in ids if i.startswith("ok")], prefix=prefix)
    assert len(stored) == 180
    letters = await read_topic(kafka, dead_letters, until=20, key_of=None)
    assert sorted(letters) == sorted(i for i in ids if i.startswith("no"))
    for (letter,) in letters.values():
        assert letter.headers[headers.ERROR_CODE] == ErrorCode.REPLY_FAILED.encode()
        assert b"Redis" in letter.headers[headers.ERROR_MESSAGE]
    # Every record has a durable outcome: the worker committed them all and went on.
    await wait_committed(kafka, settings.worker.group_id, topic)


@pytest.mark.parametrize("url_options", ["", "?decode_responses=true"])
async def test_a_result_announced_while_the_clients_subscription_was_lost_arrives_at_once(
    kafka: str,
    redis_url: str,
    model_root: Path,
    run_worker: Callable[[Settings], Any],
    url_options: str,
) -> None:
    """The client subscribes again on a new connection as soon as its reader loses the old
    one, and reads from its key what was announced in between, rather than at its deadline."""
    config = model_root / "mlp" / "config.toml"  # a lone request waits 1.5 s for company
    config.write_text(config.read_text().replace("delay_ms = 2.0", "delay_ms = 1500"))
    settings = make_settings(kafka, model_root, redis_url)
    topic = settings.worker.topic_prefix + "mlp"
    await create_topics(kafka, topic)
    await run_worker(settings)
    admin = Redis.from_url(redis_url)
    x = {"x": np.ones((1, 32), np.float32)}
    try:
        async with SurgeClient(kafka, redis_url=redis_url + url_options) as client:
            await client.predict("mlp", x, via="redis", topic=topic, timeout=20)  # warm
            started = asyncio.get_running_loop().time()
            waiting = asyncio.create_task(
                client.predict("mlp", x, via="redis", topic=topic, timeout=20)
            )
            await asyncio.sleep(0.5)  # subscribed and sent: the batch waits for company
            assert await admin.client_kill_filter(_type="pubsub") >= 1
            await waiting
            assert asyncio.get_running_loop().time() - started < 10, "waited for its deadline"
    finally:
        await admin.aclose()


class _Silencing:
    """A TCP proxy to Redis whose connections can be silenced: their bytes dropped both ways
    and their sockets left open, as after a NAT or a firewall dropped them without a reset."""

    def __init__(self, redis_url: str) -> None:
        self._upstream = urlsplit(redis_url)
        self._silenced: list[dict[str, bool]] = []
        self._pumps: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return self._upstream._replace(netloc=f"127.0.0.1:{port}").geturl()

    def silence_open_connections(self) -> int:
        for state in self._silenced:
            state["silent"] = True
        return len(self._silenced)

    async def close(self) -> None:
        self._server.close()
        for task in self._pumps:
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(
            self._upstream.hostname, self._upstream.port
        )
        state = {"silent": False}
        self._silenced.append(state)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink, state))
            self._pumps.add(task)

    @staticmethod
    async def _pump(
        source: asyncio.StreamReader, sink: asyncio.StreamWriter, state: dict[str, bool]
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                if not state["silent"]:
                    sink.write(data)
                    await sink.drain()
        if not state["silent"]:
            sink.close()


async def test_a_client_whose_redis_connections_fell_silent_gets_its_results_again(
    kafka: str, redis_url: str, model_root: Path, run_worker: Callable[[Settings], Any]
) -> None:
    """A half-open connection gives no error, only silence: the reader pings, and a
    connection that does not answer is replaced, rather than every later call timing out."""
    settings = make_settings(kafka, model_root, redis_url)
    topic = settings.worker.topic_prefix + "mlp"
    await create_topics(kafka, topic)
    await run_worker(settings)
    proxy = _Silencing(redis_url)
    x = {"x": np.ones((1, 32), np.float32)}
    try:
        async with SurgeClient(kafka, redis_url=await proxy.start()) as client:
            await client.predict("mlp", x, via="redis", topic=topic, timeout=20)
            assert proxy.silence_open_connections() >= 1
            for _ in range(3):
                await client.predict("mlp", x, via="redis", topic=topic, timeout=20)
    finally:
        await proxy.close()


async def test_a_result_in_redis_the_client_cannot_read_is_its_error_result(
    kafka: str, redis_url: str
) -> None:
    """What the client finds under a result key or on its channel, but cannot read, answers
    its call with an error result (announced: at once; stored only: when the call's wait ends
    and the stored results are read), without failing the other results read with it."""
    topic = f"surge.requests.unreadable-{uuid.uuid4().hex[:8]}"
    await create_topics(kafka, topic)
    x = {"x": np.ones((1, 32), np.float32)}
    redis = Redis.from_url(redis_url)
    try:
        async with SurgeClient(kafka, redis_url=redis_url) as client:
            call = asyncio.create_task(
                client.predict_many(
                    "mlp", [x, x, x], via="redis", topic=topic, timeout=6, return_exceptions=True
                )
            )
            sent = await read_topic(kafka, topic, until=3, key_of=None)
            announced, stored, readable = sorted(sent)
            garbage = b"\xc1 neither a result nor an error"
            await redis.set("surge:result:" + announced, garbage)
            await redis.publish("surge:result:" + announced, garbage)
            await redis.set("surge:result:" + stored, garbage)
            body = msgspec.msgpack.encode(
                {"error": "no such model", "code": "unknown_model", "id": readable}
            )
            await redis.set("surge:result:" + readable, body)
            results = await call
    finally:
        await redis.aclose()
    by_id = {result.request_id: result for result in results}
    assert set(by_id) == {announced, stored, readable}
    for request_id in (announced, stored):
        assert isinstance(by_id[request_id], PredictionError)
        assert by_id[request_id].code == ErrorCode.BAD_ENCODING
        assert request_id in by_id[request_id].message
    assert by_id[readable].code == ErrorCode.UNKNOWN_MODEL


async def test_a_call_whose_deadline_lands_while_it_subscribes_leaves_no_subscription(
    kafka: str, redis_url: str
) -> None:
    """Deadlines of a few milliseconds for thousands of requests run out while Redis is
    still confirming their subscriptions: none of them is left behind, in the client or on
    the server."""
    topic = f"surge.requests.short-{uuid.uuid4().hex[:8]}"
    await create_topics(kafka, topic)
    x = {"x": np.ones((1, 4), np.float32)}
    redis = Redis.from_url(redis_url)
    try:
        async with SurgeClient(kafka, redis_url=redis_url) as client:
            await client.predict_many(
                "mlp", [x], via="redis", topic=topic, timeout=2, return_exceptions=True
            )
            for timeout in (0.002, 0.005, 0.01, 0.02):
                results = await client.predict_many(
                    "mlp",
                    [x] * 2000,
                    via="redis",
                    topic=topic,
                    timeout=timeout,
                    return_exceptions=True,
                )
                assert all(isinstance(result, TimeoutError) for result in results)
                assert not client._subscribed
            assert await redis.pubsub_channels("surge:result:*") == []
    finally:
        await redis.aclose()


class _Endpoint:
    """A name for the Redis primary (a Kubernetes Service, a DNS name) as a TCP proxy: new
    connections go to the server it names now, established ones stay where they went."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.port)
        await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


async def test_results_go_to_the_new_primary_after_a_failover() -> None:
    """The old primary, now a replica, answers READONLY on the connections the worker holds
    to it: each try after one goes out on new connections, which the name leads to the new
    primary."""
    old, new = RedisServer().start(), RedisServer().start()
    endpoint = _Endpoint(old.port)
    url = await endpoint.start()
    redis = Redis.from_url(url, socket_timeout=5)
    replies = _replies(redis, "r:")
    try:
        ticket = SimpleNamespace(request_id="before")
        assert await replies._write_redis([(ticket, b"1")]) == []  # type: ignore[list-item]
        demoted = Redis.from_url(old.url)
        await demoted.execute_command("REPLICAOF", "127.0.0.1", str(new.port))
        await demoted.aclose()
        endpoint.port = new.port
        ticket = SimpleNamespace(request_id="after")
        refused = await asyncio.wait_for(replies._write_redis([(ticket, b"2")]), 10)  # type: ignore[list-item]
        assert refused == []
        promoted = Redis.from_url(new.url)
        assert await promoted.get("r:after") == b"2"
        await promoted.aclose()
    finally:
        await redis.aclose()
        endpoint.close()
        old.close()
        new.close()


async def _throttled_pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: float
) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(16384):
            writer.write(data)
            await writer.drain()
            await asyncio.sleep(len(data) / rate)
    writer.close()


async def _slow_link(port: int, rate: float) -> asyncio.Server:
    """A proxy to the Redis on `port` that passes `rate` bytes a second towards it."""

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(
            _throttled_pipe(reader, upstream_writer, rate), _pipe(upstream_reader, writer)
        )

    return await asyncio.start_server(forward, "127.0.0.1", 0)


async def test_results_too_many_for_one_call_over_a_slow_link_go_in_smaller_calls() -> None:
    """A call that outlasts the socket timeout on a slow link would time out at every try:
    it is split until its parts get through."""
    server = RedisServer().start()
    proxy = await _slow_link(server.port, 400_000)  # bytes/s towards Redis
    port = proxy.sockets[0].getsockname()[1]
    redis = Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=1)
    replies = _replies(redis, "slow:")
    items = [(SimpleNamespace(request_id=f"r{i}"), bytes(10_000)) for i in range(80)]  # 800 kB
    try:
        refused = await asyncio.wait_for(replies._write_redis(items), 30)  # type: ignore[arg-type]
        assert refused == []
        direct = Redis.from_url(server.url)
        assert len(await direct.keys("slow:*")) == 80
        await direct.aclose()
    finally:
        await redis.aclose()
        proxy.close()
        server.close()


async def test_a_result_longer_than_redis_takes_is_refused_and_holds_up_no_other() -> None:
    """Redis answers a bulk string over its `proto-max-bulk-len` by dropping the connection,
    as it would if it went down; while it answers a PING, that result alone is refused after
    a few tries, and the results around it are stored."""
    with RedisServer(options=["--proto-max-bulk-len", "1mb"]) as server:
        redis = Redis.from_url(server.url)
        items = [(SimpleNamespace(request_id=f"r{i}"), bytes(10)) for i in range(4)]
        items.insert(2, (SimpleNamespace(request_id="big"), bytes(16 << 20)))
        try:
            refused = await asyncio.wait_for(
                _replies(redis, "long:")._write_redis(items),  # type: ignore[arg-type]
                30,
            )
            assert [ticket.request_id for ticket, _ in refused] == ["big"]
            assert "cut off 3 times while Redis answers" in str(refused[0][1])
            assert sorted(await redis.keys("long:*")) == [f"long:r{i}".encode() for i in range(4)]
        finally:
            await redis.aclose()


async def test_a_result_too_slow_to_send_alone_over_a_slow_link_is_refused() -> None:
    """Halving ends at one result that still outlasts the socket timeout at every try: it is
    refused, rather than retried for ever ahead of every later result."""
    server = RedisServer().start()
    proxy = await _slow_link(server.port, 400_000)  # bytes/s towards Redis
    port = proxy.sockets[0].getsockname()[1]
    redis = Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=1)
    items = [(SimpleNamespace(request_id="big"), bytes(1_200_000)), *_items([10, 10])]
    started = time.monotonic()
    try:
        refused = await asyncio.wait_for(
            _replies(redis, "slowest:")._write_redis(items),  # type: ignore[arg-type]
            30,
        )
        assert [ticket.request_id for ticket, _ in refused] == ["big"]
        assert "slower to send than socket_timeout_s" in str(refused[0][1])
        direct = Redis.from_url(server.url)
        assert {b"slowest:r0", b"slowest:r1"} <= set(await direct.keys("slowest:*"))
        await direct.aclose()
        assert time.monotonic() - started < 15
    finally:
        await redis.aclose()
        proxy.close()
        server.close()


@pytest.mark.integration
async def test_a_request_kafka_refuses_does_not_hold_its_call_to_the_timeout(
    kafka: str, redis_url: str, model_root: Path, run_worker: Callable[[Settings], Any]
) -> None:
    """Its refusal is its result: the call ends once the others are answered."""
    settings = make_settings(kafka, model_root, redis_url)
    topic = settings.worker.topic_prefix + "mlp"
    await create_topics(kafka, topic, configs={"max.message.bytes": "3000"})
    await run_worker(settings)
    small, large = {"x": np.ones((1, 32), np.float32)}, {"x": np.ones((1, 2000), np.float32)}
    async with SurgeClient(kafka, redis_url=redis_url) as client:
        started = time.monotonic()
        results = await client.predict_many(
            "mlp",
            [small] * 12 + [large] + [small] * 12,
            via="redis",
            topic=topic,
            timeout=30,
            return_exceptions=True,
        )
    assert time.monotonic() - started < 15, results
    assert isinstance(results[12], MessageSizeTooLargeError), results
    # Kafka refuses a record batch whole: one that shared the large one's batch goes with it.
    assert all(isinstance(r, Prediction | MessageSizeTooLargeError) for r in results), results
    assert any(isinstance(r, Prediction) for r in results), results


async def test_results_read_back_at_a_deadline_are_those_still_missing(
    kafka: str, redis_url: str
) -> None:
    """At its deadline a call reads what it missed from the keys: the results it has already
    (large, perhaps) are not read again, and many missing are read a few at a time."""
    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    ids = [f"r{i}" for i in range(150)]
    response = {"model_name": "m", "id": "", "outputs": []}
    async with SurgeClient(kafka, redis_url=redis_url, redis_prefix=prefix) as client:
        await client._reply_channel("redis")
        direct = Redis.from_url(redis_url)
        for request_id in ids:
            body = msgspec.msgpack.encode(response | {"id": request_id})
            await direct.set(prefix + request_id, body)
        await direct.aclose()
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in ids]
        futures[0].set_result("answered already")
        asked: list[list[str]] = []
        mget = client._redis.mget  # type: ignore[union-attr]

        async def counted(keys: list[str]) -> list[Any]:
            asked.append(keys)
            return await mget(keys)

        client._redis.mget = counted  # type: ignore[union-attr,method-assign]
        await client._fetch_missed(ids, futures)
    assert [len(keys) for keys in asked] == [64, 64, 21]
    assert prefix + "r0" not in {key for keys in asked for key in keys}
    assert all(future.done() for future in futures)
    assert futures[1].result().id == "r1"


async def test_a_subscription_made_while_another_caller_rebuilds_the_connection_waits_for_it(
    kafka: str, redis_url: str
) -> None:
    """Between a caller's check of the connection and its subscription, another may have
    taken the lost connection down to rebuild it: the subscription goes on the new one."""
    async with SurgeClient(kafka, redis_url=redis_url) as client:
        await client._reply_channel("redis")
        await client._stop_redis()  # as a caller finding its reader dead does, under the lock
        pubsub = await client._subscribe_now(["r1"])
        assert pubsub is not None
        assert pubsub is client._pubsub


async def test_results_missed_while_resubscribing_are_read_even_if_the_first_read_fails(
    kafka: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Subscribed again after losing its connection, a caller reads the keys of what it may
    have missed; a read that fails is tried again, not left to the caller's deadline."""
    topic = f"test.requests.{uuid.uuid4().hex[:8]}"
    await create_topics(kafka, topic)  # no worker: the result is stored by hand, unannounced
    fetch_missed = SurgeClient._fetch_missed
    failures: list[str] = []

    async def failing_once(self: SurgeClient, *args: Any) -> None:
        if not failures:
            failures.append("max number of clients reached")
            raise RedisConnectionError(failures[0])
        await fetch_missed(self, *args)

    monkeypatch.setattr(SurgeClient, "_fetch_missed", failing_once)
    admin = Redis.from_url(redis_url)
    x = {"x": np.ones((1, 32), np.float32)}
    try:
        async with SurgeClient(kafka, redis_url=redis_url) as client:
            started = asyncio.get_running_loop().time()
            waiting = asyncio.create_task(
                client.predict("mlp", x, via="redis", topic=topic, timeout=20)
            )
            await asyncio.sleep(0.5)  # subscribed and sent
            (request_id,) = client._waiting
            body = {"model_name": "mlp", "id": request_id, "outputs": []}
            await admin.set("surge:result:" + request_id, msgspec.msgpack.encode(body))
            assert await admin.client_kill_filter(_type="pubsub") >= 1
            result = await waiting
            assert result.id == request_id
            assert failures
            assert asyncio.get_running_loop().time() - started < 10, "waited for its deadline"
    finally:
        await admin.aclose()


async def test_results_stored_are_settled_without_waiting_for_a_later_chunk() -> None:
    """A take of results goes to Redis in chunks of a few MB: one held up (waiting for its
    replicas, say) must not hold back the commits of those stored before it."""
    redis = Redis.from_url("redis://127.0.0.1:1/0")  # never reached: the writes stand in
    replies = _replies(redis, "test:")
    held, calls = asyncio.Event(), []

    async def write(items: list[Any]) -> list[Any]:
        calls.append(len(items))
        if len(calls) > 1:
            await held.wait()
        return []

    replies._write_redis = write  # type: ignore[method-assign]
    tickets = [make_ticket(b"{}") for _ in range(2)]
    for offset, ticket in enumerate(tickets):
        ticket.offset = offset
        replies._ledger.admit(ticket)
        replies._redis_box.put((ticket, bytes(3 << 20)))  # one chunk each
    replies.start()
    try:
        async with asyncio.timeout(5):
            while len(calls) < 2:
                await asyncio.sleep(0.01)
        assert (tickets[0].settled, tickets[1].settled) == (True, False)
        held.set()
        async with asyncio.timeout(5):
            while not tickets[1].settled:
                await asyncio.sleep(0.01)
    finally:
        await replies.close()
        await redis.aclose()
