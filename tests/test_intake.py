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


def _fetch(partitions: int, per_partition: int) -> dict[TopicPartition, list[ConsumerRecord]]:
    route = tuple(request_headers(model="mlp", content_type=MSGPACK, reply_to="replies"))
    x = {"x": np.ones((1, MLP_FEATURES), np.float32)}
    fetch, now_ms = {}, int(time.time() * 1000)
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


async def test_revoked_mid_fetch_leaves_the_rest_unread(tmp_path: Path) -> None:
    write_mlp(tmp_path)
    settings = load_settings(
        env={
            "SURGE_WORKER__MODEL_ROOT": str(tmp_path),
            "SURGE_WORKER__TOPICS": f'{{"mlp": "{TOPIC}"}}',
        }
    )
    worker = Worker(settings)
    worker._redis = None
    ledger = worker._ledger = Ledger(settings.worker.max_in_flight, 1 << 30)
    outbox = Outbox()
    await worker.serve_models(outbox.put)
    written: list[Write] = []

    async def acknowledge() -> None:  # every write counts as durable once handed over
        while True:
            writes: list[Write] = await outbox.take()
            written.extend(writes)
            ledger.settle_all([w.ticket for w in writes])

    acking = asyncio.create_task(acknowledge())
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
    acking.cancel()
    await worker._repository.close()
