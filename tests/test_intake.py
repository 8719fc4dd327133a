"""A partition revoked while a fetch is being taken in: the rest of its records in that
fetch is left to the partition's next owner, and what was taken is still answered."""

from __future__ import annotations

import asyncio
from pathlib import Path

from surge.examples import write_mlp
from surge.workers.ledger import Ledger
from surge.workers.tasks import Outbox
from surge.workers.writes import Write
from tests.helpers import mlp_fetch, serving_worker

TOPIC = "requests"


class _Serving:
    """A worker's serving path whose Kafka writes count as durable once handed over."""

    def __init__(self, model_root: Path) -> None:
        write_mlp(model_root)
        self.model_root = model_root
        self.ledger = Ledger(max_records=10_000, max_bytes=1 << 30)
        self.outbox = Outbox()
        self.written: list[Write] = []

    async def __aenter__(self) -> _Serving:
        self.worker = await serving_worker(self.model_root, TOPIC, self.ledger, self.outbox.put)
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
            fetch = mlp_fetch(TOPIC, partitions=1, per_partition=5, timestamp=stamp)
            await serving.worker.intake(fetch)
            await asyncio.wait_for(serving.ledger.drained(), 10)
    assert len(serving.written) == 10


async def test_revoked_mid_fetch_leaves_the_rest_unread(tmp_path: Path) -> None:
    async with _Serving(tmp_path) as serving:
        worker, ledger, written = serving.worker, serving.ledger, serving.written
        fetch = mlp_fetch(TOPIC, partitions=3, per_partition=50)
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
