"""Credentials pass through: a password-protected Redis, and a Kafka listener with SASL/PLAIN."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as redis_asyncio
from redis.exceptions import AuthenticationError, ResponseError

from surge.config import Settings, load_settings
from surge.producers import SurgeClient
from surge.workers import Worker
from tests.conftest import worker_env
from tests.services import KafkaBroker, RedisServer
from tests.test_cli import surge

pytestmark = pytest.mark.integration

USERS = {"admin": "admin-secret", "surge": "surge-secret"}


@pytest.fixture
def locked_redis() -> Iterator[RedisServer]:
    server = RedisServer(password="s3cret-pass").start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def sasl_kafka() -> Iterator[KafkaBroker]:
    broker = KafkaBroker(sasl_users=USERS, tls=True).start()
    yield broker
    broker.close()


async def test_redis_replies_with_a_password(
    kafka: str,
    locked_redis: RedisServer,
    model_root: Path,
    run_worker: Callable[[Settings], Worker],
) -> None:
    anonymous = redis_asyncio.Redis(port=locked_redis.port)
    with pytest.raises((AuthenticationError, ResponseError)):
        await anonymous.ping()
    await anonymous.aclose()

    url = f"redis://127.0.0.1:{locked_redis.port}/0"  # the password comes from its own field
    env = worker_env(kafka, model_root, url, SURGE_REDIS__PASSWORD="s3cret-pass")
    worker = await run_worker(load_settings(env=env))
    async with SurgeClient(
        kafka,
        topic_prefix=worker.settings.worker.topic_prefix,
        redis_url=url,
        redis_options={"password": "s3cret-pass"},
    ) as client:
        result = await client.predict("mlp", {"x": np.ones((1, 32), np.float32)}, via="redis")
    assert result.outputs["probs"].shape == (1, 10)


async def test_kafka_sasl_plain(
    sasl_kafka: KafkaBroker,
    model_root: Path,
    run_worker: Callable[[Settings], Worker],
    tmp_path: Path,
) -> None:
    env = worker_env(
        sasl_kafka.sasl_bootstrap,
        model_root,
        None,
        SURGE_KAFKA__SECURITY_PROTOCOL="SASL_PLAINTEXT",
        SURGE_KAFKA__SASL_MECHANISM="PLAIN",
        SURGE_KAFKA__SASL_USERNAME="surge",
        SURGE_KAFKA__SASL_PASSWORD="surge-secret",
    )
    worker = await run_worker(load_settings(env=env))
    credentials = {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "PLAIN",
        "sasl_plain_username": "surge",
        "sasl_plain_password": "surge-secret",
    }
    async with SurgeClient(
        sasl_kafka.sasl_bootstrap,
        topic_prefix=worker.settings.worker.topic_prefix,
        reply_topic=f"test.replies.{uuid.uuid4().hex[:8]}",
        kafka_options=credentials,
    ) as client:
        result = await client.predict("mlp", {"x": np.ones((1, 32), np.float32)}, timeout=30)
    assert result.model_name == "mlp"

    # The command-line clients connect as the workers' settings say.
    config = tmp_path / "surge.toml"
    config.write_text(
        f'[kafka]\nbootstrap_servers = "{sasl_kafka.sasl_bootstrap}"\n'
        'security_protocol = "SASL_PLAINTEXT"\nsasl_mechanism = "PLAIN"\n'
        'sasl_username = "surge"\nsasl_password = "surge-secret"\n'
    )
    topic = worker.settings.worker.topic_prefix + "mlp"
    one = ("-i", f"x={[[1.0] * 32]}", "--topic", topic, "--timeout", "30")
    answered = await asyncio.to_thread(surge, "predict", "mlp", *one, "-c", str(config))
    assert answered.returncode == 0, answered.stdout + answered.stderr
    assert '"model_name": "mlp"' in answered.stdout
    letters = await asyncio.to_thread(surge, "dlq", "inspect", "-c", str(config))
    assert letters.returncode == 0, letters.stdout + letters.stderr


@pytest.fixture
def tls_redis() -> Iterator[RedisServer]:
    server = RedisServer(tls=True).start()
    yield server  # requested before run_worker: the worker stops before the server does
    server.close()


async def test_redis_replies_over_tls(
    kafka: str, tls_redis: RedisServer, model_root: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    ca = str(tls_redis.ca_file)
    env = worker_env(kafka, model_root, tls_redis.url, SURGE_REDIS__SSL_CA_CERTS=ca)
    worker = await run_worker(load_settings(env=env))
    async with SurgeClient(
        kafka,
        topic_prefix=worker.settings.worker.topic_prefix,
        redis_url=tls_redis.url,
        # Bounded like the worker's: a stalled TLS connection fails the test, never hangs it.
        redis_options={"ssl_ca_certs": ca, "socket_timeout": 5, "socket_connect_timeout": 5},
    ) as client:
        result = await client.predict("mlp", {"x": np.ones((1, 32), np.float32)}, via="redis")
    assert result.outputs["probs"].shape == (1, 10)


async def test_kafka_over_tls(
    sasl_kafka: KafkaBroker, model_root: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    ca = str(sasl_kafka.ca_file)
    env = worker_env(
        sasl_kafka.ssl_bootstrap,
        model_root,
        None,
        SURGE_KAFKA__SECURITY_PROTOCOL="SSL",
        SURGE_KAFKA__SSL_CAFILE=ca,
    )
    settings = load_settings(env=env)
    worker = await run_worker(settings)
    async with SurgeClient(
        sasl_kafka.ssl_bootstrap,
        topic_prefix=worker.settings.worker.topic_prefix,
        reply_topic=f"test.replies.{uuid.uuid4().hex[:8]}",
        kafka_options=settings.kafka.client_options() | {"client_id": "test-client"},
    ) as client:
        result = await client.predict("mlp", {"x": np.ones((1, 32), np.float32)}, timeout=30)
    assert result.model_name == "mlp"
