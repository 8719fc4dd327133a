"""A client that cannot start releases what it opened."""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest
from aiokafka.errors import KafkaConnectionError

from surge.producers import SurgeClient, SyncClient
from tests.services import free_port


async def test_a_client_that_cannot_reach_kafka_leaves_no_producer_open() -> None:
    """A service that retries creating its client must not pile up half-started ones."""
    leaks: list[str] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: leaks.append(context["message"]))
    try:
        for _ in range(3):
            with pytest.raises(KafkaConnectionError):
                async with SurgeClient(f"127.0.0.1:{free_port()}"):
                    pass
        gc.collect()
    finally:
        loop.set_exception_handler(previous)
    assert not [message for message in leaks if "Unclosed" in message]


def test_a_sync_client_that_cannot_reach_kafka_leaves_no_thread() -> None:
    # Compared by identity: threads left by earlier tests may end meanwhile.
    before = set(threading.enumerate())
    for _ in range(3):
        with pytest.raises(KafkaConnectionError):
            SyncClient(f"127.0.0.1:{free_port()}")
    assert not set(threading.enumerate()) - before
