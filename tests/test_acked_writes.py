"""At-least-once writes: a partition whose batches the producer cannot take (its leader gone,
until they expire) holds up no other partition's results, and a batch never acknowledged is
given up on after reply_retry_s."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from surge.workers.acked import AckedWrites
from surge.workers.ledger import Ledger
from surge.workers.writes import RetryPolicy, TopicLookup, Write
from tests.helpers import make_ticket


class _Producer:
    """The producer's side of a pass, as a plain object: it takes batches at once, but for
    one topic whose first batch it never sends, so that every later one waits to be taken
    (as for a partition whose leader is gone, until its batch expires)."""

    def __init__(self, stuck: str) -> None:
        self.client = SimpleNamespace(cluster=SimpleNamespace(partitions_for_topic=lambda _: {0}))
        self._stuck = stuck
        self._in_flight = False
        self.sent: list[str] = []  # the topics of the batches it took
        self.stopped = False

    async def stop(self) -> None:
        self.stopped = True

    def create_batch(self) -> Any:
        return SimpleNamespace(append=lambda **_: True)

    async def send_batch(self, batch: Any, topic: str, partition: int) -> asyncio.Future[None]:
        delivery = asyncio.get_running_loop().create_future()
        if topic != self._stuck:
            delivery.set_result(None)
        elif self._in_flight:
            await asyncio.Event().wait()  # never taken
        self._in_flight = self._in_flight or topic == self._stuck
        self.sent.append(topic)
        return delivery


async def test_a_partition_that_takes_no_writes_holds_up_no_other_results() -> None:
    ledger = Ledger(100, 1 << 20)
    crashes: list[BaseException] = []
    acked = AckedWrites(
        _Producer("stuck"),  # type: ignore[arg-type]
        ledger,
        RetryPolicy("dead", 60, crashes.append),
        crashes.append,
        TopicLookup({}, 1),
    )

    def write(topic: str, offset: int) -> Write:
        ticket = make_ticket(b"{}")
        ticket.offset = offset
        ledger.admit(ticket)
        return Write(ticket, topic, b"result", [], dead_letter=False)

    acked.start()
    try:
        for offset in range(2):  # in flight for good, then one waiting behind it
            acked.put(write("stuck", offset))
            await asyncio.sleep(0.05)
        healthy = [write("healthy", offset) for offset in range(5)]
        for result in healthy:
            acked.put(result)
        async with asyncio.timeout(3):
            while not all(result.ticket.settled for result in healthy):
                await ledger.progress()
    finally:
        await acked.close()
    assert not crashes


async def test_a_bug_sending_a_result_aside_stops_the_worker() -> None:
    """A write for a topic the producer knows nothing of goes aside; a bug there (not a refusal)
    must not leave its result unsettled with nothing said."""

    class Broken(TopicLookup):
        async def exists(self, topic: str, *, fresh: bool = False) -> bool:
            raise RuntimeError("a bug")

    producer = _Producer("stuck")
    producer.client.cluster.partitions_for_topic = lambda _: None  # type: ignore[attr-defined]
    crashes: list[BaseException] = []
    acked = AckedWrites(
        producer,  # type: ignore[arg-type]
        Ledger(100, 1 << 20),
        RetryPolicy("dead", 60, crashes.append),
        crashes.append,
        Broken({}, 1),
    )
    acked.start()
    try:
        acked.put(Write(make_ticket(b"{}"), "new-topic", b"result", [], dead_letter=False))
        for _ in range(100):
            if crashes:
                break
            await asyncio.sleep(0.01)
        assert [repr(exc) for exc in crashes] == ["RuntimeError('a bug')"]
    finally:
        await acked.close()


async def test_a_batch_never_acknowledged_is_dead_lettered_on_a_new_producer() -> None:
    """aiokafka retries a retriable refusal forever: after reply_retry_s the worker gives the
    batch up, dead-letters its results, and replaces the producer that still holds it."""
    ledger = Ledger(100, 1 << 20)
    crashes: list[BaseException] = []
    stuck = _Producer("stuck")
    fresh: list[_Producer] = []

    async def new_producer() -> Any:
        fresh.append(_Producer("stuck"))
        return fresh[-1]

    acked = AckedWrites(
        stuck,  # type: ignore[arg-type]
        ledger,
        RetryPolicy("dead", 0.3, crashes.append),
        crashes.append,
        TopicLookup({}, 1),
        new_producer,
    )
    ticket = make_ticket(b"{}")
    ledger.admit(ticket)
    acked.start()
    try:
        acked.put(Write(ticket, "stuck", b"result", [], dead_letter=False))
        async with asyncio.timeout(3):
            while not ticket.settled:
                await ledger.progress()
    finally:
        await acked.close()
    assert not crashes
    assert stuck.sent == ["stuck"]
    assert stuck.stopped
    assert [producer.sent for producer in fresh] == [["dead"]]
