"""A partition revoked while a fetch is being taken in: the rest of its records in that
fetch is left to the partition's next owner, and what was taken is still answered."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from surge.examples import MLP_FEATURES, write_mlp
from surge.producers import request_body, request_headers
from surge.schemas import MSGPACK, headers
from surge.workers.ledger import Ledger
from surge.workers.tasks import Outbox
from surge.workers.writes import Records, Write
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
            items: list[Write | Records] = await self.outbox.take()
            writes = [
                write
                for item in items
                for write in (item.all_writes() if isinstance(item, Records) else [item])
            ]
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


async def test_every_record_of_a_mixed_fetch_gets_its_own_outcome(tmp_path: Path) -> None:
    """Runs of records with the same headers are taken in together; a run holding one record
    routing refuses, or one body that does not decode, still answers each record for itself."""
    rows = np.ones((1, MLP_FEATURES), np.float32)
    plain = request_headers(model="mlp", content_type=MSGPACK, reply_to="replies")
    elsewhere = request_headers(model="mlp", content_type=MSGPACK, reply_to="other")
    late = request_headers(model="mlp", content_type=MSGPACK, reply_to="replies", deadline_ms=1)
    refused = request_headers(model="mlp", content_type=MSGPACK, reply_to="bad topic!")
    good = {"value": None}
    plan = [
        *[(plain, good)] * 4,
        (elsewhere, good),
        (plain, {"value": b"\x00" * 1_100_000}),  # over max_message_bytes
        *[(plain, good)] * 2,
        (plain, {"value": b"\xc1" + request_body({"x": rows}, "r-08", MSGPACK)[1:]}),
        *[(plain, good)] * 2,
        *[(late, good)] * 2,
        (refused, good),
    ]
    records = [
        ConsumerRecord(
            TOPIC,
            0,
            offset,
            int(time.time() * 1000),
            0,
            f"r-{offset:02d}".encode(),
            body["value"] or request_body({"x": rows}, f"r-{offset:02d}", MSGPACK),
            None,
            4,
            0,
            (*route,),
        )
        for offset, (route, body) in enumerate(plan)
    ]
    async with _Serving(tmp_path) as serving:
        await serving.worker.intake({TopicPartition(TOPIC, 0): records})
        await asyncio.wait_for(serving.ledger.drained(), 10)
        committable = serving.ledger.offsets.committable()
    outcomes = {}
    for write in serving.written:
        fields = dict(write.headers)
        outcomes[write.ticket.offset] = (
            write.topic,
            (fields.get(headers.ERROR_CODE) or fields[headers.STATUS]).decode(),
        )
    ids = [write.ticket.request_id for write in serving.written]
    assert outcomes == {
        **dict.fromkeys((0, 1, 2, 3, 6, 7, 9, 10), ("replies", "ok")),
        4: ("other", "ok"),
        5: ("replies", "too_large"),
        8: ("replies", "bad_encoding"),
        11: ("replies", "expired"),
        12: ("replies", "expired"),
        13: ("surge.dead-letters", "invalid_reply_to"),
    }
    assert sorted(ids) == [f"r-{offset:02d}" for offset in range(len(plan))]
    assert committable == {TopicPartition(TOPIC, 0): len(plan)}


async def test_a_failure_after_a_run_is_admitted_still_answers_each_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _Serving(tmp_path) as serving:
        batcher = next(iter(serving.worker._repository.served.values())).batcher

        def broken(jobs: object) -> None:
            raise RuntimeError("queue broken")

        monkeypatch.setattr(batcher, "put_all", broken)
        await serving.worker.intake(mlp_fetch(TOPIC, partitions=2, per_partition=3))
        await asyncio.wait_for(serving.ledger.drained(), 10)
    codes = [dict(write.headers).get(headers.ERROR_CODE) for write in serving.written]
    assert codes == [b"internal"] * 6
