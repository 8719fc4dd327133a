"""At-least-once writes: a partition whose batches the producer cannot take (its leader gone,
until they expire) holds up no other partition's results, and a batch never acknowledged is
given up on after reply_retry_s."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from aiokafka.errors import CorruptRecordException

from surge.schemas import ErrorCode, headers
from surge.workers.acked import AckedWrites
from surge.workers.ledger import Ledger
from surge.workers.tickets import Rejection
from surge.workers.writes import RetryPolicy, TopicLookup, Write, dead_letter
from tests.helpers import make_ticket


class _Producer:
    """The producer's side of a pass, as a plain object: it takes batches at once, but for
    one topic whose first batch it never sends, so that every later one waits to be taken
    (as for a partition whose leader is gone, until its batch expires)."""

    def __init__(self, stuck: str, refused: str | None = None) -> None:
        self.client = SimpleNamespace(cluster=SimpleNamespace(partitions_for_topic=lambda _: {0}))
        self._stuck = stuck
        self._refused = refused  # a topic whose every batch is refused for good
        self._in_flight = False
        self.sent: list[str] = []  # the topics of the batches it took
        self.stopped = False

    async def stop(self) -> None:
        self.stopped = True

    def create_batch(self) -> Any:
        return SimpleNamespace(append=lambda **_: True)

    async def send_batch(self, batch: Any, topic: str, partition: int) -> asyncio.Future[None]:
        delivery = asyncio.get_running_loop().create_future()
        if topic == self._refused:
            delivery.set_exception(CorruptRecordException())
        elif topic != self._stuck:
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


async def test_a_batch_acknowledged_while_its_producer_is_replaced_is_not_sent_again() -> None:
    """Giving a producer up takes a moment (a new one starts): a batch of it that the broker
    acknowledges meanwhile is written, and settled, not sent again on the new producer."""
    ledger = Ledger(100, 1 << 20)
    crashes: list[BaseException] = []
    stuck = _Producer("stuck")
    held: list[asyncio.Future[None]] = []
    fresh: list[_Producer] = []
    sent_before = stuck.send_batch

    async def send_batch(batch: Any, topic: str, partition: int) -> asyncio.Future[None]:
        if topic != "late":
            return await sent_before(batch, topic, partition)
        stuck.sent.append(topic)
        held.append(asyncio.get_running_loop().create_future())  # acknowledged later
        return held[-1]

    written: list[bytes] = []  # the records the new producer took

    async def new_producer() -> Any:
        held[0].set_result(None)  # the broker's answer comes as the new producer starts
        await asyncio.sleep(0.2)
        fresh.append(_Producer("stuck"))
        fresh[-1].create_batch = lambda: SimpleNamespace(  # type: ignore[method-assign]
            append=lambda **record: written.append(record["value"]) or True
        )
        return fresh[-1]

    stuck.send_batch = send_batch  # type: ignore[method-assign]
    acked = AckedWrites(
        stuck,  # type: ignore[arg-type]
        ledger,
        RetryPolicy("dead", 0.3, crashes.append),
        crashes.append,
        TopicLookup({}, 1),
        new_producer,
    )
    tickets = [make_ticket(b"{}"), make_ticket(b"{}")]
    for ticket in tickets:
        ledger.admit(ticket)
    acked.start()
    try:
        acked.put(Write(tickets[0], "stuck", b"result", [], dead_letter=False))
        await asyncio.sleep(0.1)
        acked.put(Write(tickets[1], "late", b"result", [], dead_letter=False))
        async with asyncio.timeout(3):
            while not all(ticket.settled for ticket in tickets):
                await ledger.progress()
        await asyncio.sleep(0.1)
    finally:
        await acked.close()
    assert not crashes
    assert stuck.sent == ["stuck", "late"]
    assert [producer.sent for producer in fresh] == [["dead"]]
    assert len(written) == 1  # the overdue result's dead letter alone


class _Quarantining:
    """At-least-once writes with a reply_retry_s of 0.3 s over plain producers: the first
    never acknowledges a batch to "stuck"; those made later take `stuck` and `refused` as
    given, in turn."""

    def __init__(self, *made: tuple[str, str | None]) -> None:
        self.ledger = Ledger(100, 1 << 20)
        self.crashes: list[BaseException] = []
        self.first = _Producer("stuck")
        self.made: list[_Producer] = []
        kinds = iter(made)

        async def new_producer() -> Any:
            self.made.append(_Producer(*next(kinds)))
            return self.made[-1]

        self.acked = AckedWrites(
            self.first,  # type: ignore[arg-type]
            self.ledger,
            RetryPolicy("dead", 0.3, self.crashes.append),
            self.crashes.append,
            TopicLookup({}, 1),
            new_producer,
        )

    async def settled(self, topic: str) -> None:
        """Write a result to `topic`, and wait for it to be settled (or dead-lettered)."""
        ticket = make_ticket(b"{}")
        self.ledger.admit(ticket)
        self.acked.put(Write(ticket, topic, b"result", [], dead_letter=False))
        async with asyncio.timeout(3):
            while not ticket.settled:
                await self.ledger.progress()


async def test_a_partition_given_up_on_is_written_apart_until_it_takes_a_write() -> None:
    """Once a partition's batch has been given up on, its writes go on a producer of their
    own: given up on again, that one alone is replaced, and the shared producer goes on
    untouched. Its first acknowledged write sends the partition back to the shared one."""
    writes = _Quarantining(("none", None), ("stuck", None), ("none", None))
    writes.acked.start()
    try:
        await writes.settled("stuck")  # given up on: dead-lettered, the shared one replaced
        shared = writes.made[0]
        await asyncio.gather(writes.settled("stuck"), writes.settled("healthy"))
        await writes.settled("stuck")  # on a new quarantine producer, which takes it
        await writes.settled("stuck")  # back on the shared producer
    finally:
        await writes.acked.close()
    assert not writes.crashes
    assert (writes.first.sent, writes.first.stopped) == (["stuck"], True)
    assert writes.acked.producer is shared
    assert not shared.stopped
    assert shared.sent == ["dead", "healthy", "dead", "stuck"]
    quarantines = [(p.sent, p.stopped) for p in writes.made[1:]]
    assert quarantines == [(["stuck"], True), (["stuck"], True)]


async def test_a_write_refused_for_good_in_quarantine_replaces_that_producer_alone() -> None:
    """aiokafka fails every later batch to a partition where one was refused for good: the
    quarantine producer is replaced then, not the shared one."""
    writes = _Quarantining(("none", None), ("none", "stuck"), ("none", None))
    writes.acked.start()
    try:
        await writes.settled("stuck")  # given up on: the partition quarantined
        shared = writes.made[0]
        await writes.settled("stuck")  # refused for good: dead-lettered, its producer retired
        await writes.settled("stuck")  # on a new quarantine producer, which takes it
    finally:
        await writes.acked.close()
    assert not writes.crashes
    assert writes.acked.producer is shared
    assert not shared.stopped
    assert shared.sent == ["dead", "dead"]
    quarantines = [(p.sent, p.stopped) for p in writes.made[1:]]
    assert quarantines == [(["stuck"], True), (["stuck"], True)]


def test_a_dead_letters_error_header_is_cut_at_a_characters_end() -> None:
    """The reason is kept to 1,024 bytes of UTF-8 that a strict reader still decodes."""
    reason = "x" + "é" * 1000  # two bytes each: 1,024 falls inside one
    letter = dead_letter(make_ticket(b"{}"), Rejection(ErrorCode.MODEL_ERROR, reason), "dlq")
    message = dict(letter.headers)[headers.ERROR_MESSAGE]
    assert len(message) == 1023
    assert message.decode() == reason[:512]
