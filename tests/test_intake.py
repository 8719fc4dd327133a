"""A partition revoked while a fetch is being taken in: the rest of its records in that
fetch is left to the partition's next owner, and what was taken is still answered."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
from aiokafka.structs import ConsumerRecord, TopicPartition

from surge.config import load_settings
from surge.examples import MLP_FEATURES, write_mlp
from surge.producers import request_body, request_headers
from surge.schemas import MSGPACK
from surge.workers.ledger import Ledger
from surge.workers.tasks import Outbox
from surge.workers.worker import Worker
from surge.workers.writes import Write

TOPIC = "requests"


def _fetch(
    partitions: int, per_partition: int, timestamp: int | None = -2
) -> dict[TopicPartition, list[ConsumerRecord]]:
    """Records as getmany returns them, stamped now unless `timestamp` says otherwise."""
    route = tuple(request_headers(model="mlp", content_type=MSGPACK, reply_to="replies"))
    x = {"x": np.ones((1, MLP_FEATURES), np.float32)}
    fetch, now_ms = {}, int(time.time() * 1000) if timestamp == -2 else timestamp
    for partition in range(partitions):
        records = []
        for offset in range(per_partition):
            key = f"{partition}-{offset}"
            value = request_body(x, key, MSGPACK)
            records.append(
                ConsumerRecord(
                    TOPIC, partition, offset, now_ms, 0, key.encode(), value, None, 0, 0, route
                )
            )
        fetch[TopicPartition(TOPIC, partition)] = records
    return fetch


class _Serving:
    """A worker's serving path (as `Worker._start` builds it) whose Kafka writes count as
    durable once handed over."""

    def __init__(self, model_root: Path) -> None:
        write_mlp(model_root)
        settings = load_settings(
            env={
                "SURGE_WORKER__MODEL_ROOT": str(model_root),
                "SURGE_WORKER__TOPICS": f'{{"mlp": "{TOPIC}"}}',
            }
        )
        self.worker = Worker(settings)
        self.worker._redis = None
        self.ledger = self.worker._ledger = Ledger(settings.worker.max_in_flight, 1 << 30)
        self.outbox = Outbox()
        self.written: list[Write] = []

    async def __aenter__(self) -> _Serving:
        await self.worker.serve_models(self.outbox.put)
        self._acking = asyncio.create_task(self._acknowledge())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._acking.cancel()
        await self.worker._repository.close()

    async def _acknowledge(self) -> None:
        while True:
            writes: list[Write] = await self.outbox.take()
            self.written.extend(writes)
            self.ledger.settle_all([w.ticket for w in writes])


async def test_records_without_a_timestamp_are_served(tmp_path: Path) -> None:
    async with _Serving(tmp_path) as serving:
        for stamp in (None, -1):  # old-format records carry none; some carry -1
            await serving.worker.intake(_fetch(partitions=1, per_partition=5, timestamp=stamp))
            await asyncio.wait_for(serving.ledger.drained(), 10)
    assert len(serving.written) == 10


async def test_revoked_mid_fetch_leaves_the_rest_unread(tmp_path: Path) -> None:
    async with _Serving(tmp_path) as serving:
        worker, ledger, written = serving.worker, serving.ledger, serving.written
        fetch = _fetch(partitions=3, per_partition=50)
        first, second, third = fetch
        # The loop yields after each partition; a rebalance marks the third revoked then.
        asyncio.get_running_loop().call_soon(worker._revoked.add, third)
        await worker.intake(fetch)
        await asyncio.wait_for(ledger.drained(), 10)
        answered = {w.key.decode().split("-")[0] for w in written if w.key is not None}
        assert (answered, len(written)) == ({"0", "1"}, 100)
        assert ledger.offsets.committable() == {first: 50, second: 50}

        # Assigned again, it is read again from its committed offset, and taken in whole.
        await worker.intake({third: fetch[third]})
        await asyncio.wait_for(ledger.drained(), 10)
        assert len(written) == 150
        assert ledger.offsets.committable() == {first: 50, second: 50, third: 50}
