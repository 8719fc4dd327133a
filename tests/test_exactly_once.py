"""The exactly-once mode on real Kafka: every request has exactly one committed outcome, and a
worker that lost its partitions (a zombie) can commit nothing."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import GroupCoordinatorNotAvailableError, ProducerFenced

from surge.config import Settings
from surge.producers import request_body, request_headers
from surge.schemas import MSGPACK, headers
from surge.workers import Ledger, Ticket, Worker
from surge.workers import transactions as transactions_module
from surge.workers.transactions import Transactions
from surge.workers.worker import _Rebalance
from surge.workers.writes import Records, RetryPolicy, Write
from tests.conftest import make_settings
from tests.helpers import create_topics, publish, read_redis, read_to_end, wait_committed

pytestmark = pytest.mark.integration


async def test_each_request_has_exactly_one_outcome(
    kafka: str, redis_url: str, model_root: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    run = uuid.uuid4().hex[:8]
    replies, dead_letters = f"test.replies.{run}", f"test.dead.{run}"
    settings = make_settings(
        kafka,
        model_root,
        redis_url,
        SURGE_WORKER__DELIVERY="exactly_once",
        SURGE_WORKER__DEAD_LETTER_TOPIC=dead_letters,
    )
    topic = settings.worker.topic_prefix + "mlp"
    await create_topics(kafka, topic, replies, dead_letters)
    await run_worker(settings)

    x = {"x": np.ones((1, 32), np.float32)}
    records, to_kafka, to_redis, unanswerable = [], [], [], []
    for i in range(2_000):
        request_id = f"{run}-{i}"
        reply_to = "redis" if i % 10 == 0 else replies
        route = request_headers(model="mlp", content_type=MSGPACK, reply_to=reply_to)
        body = request_body(x, request_id, MSGPACK)
        if i % 50 == 1:
            body = b"\xc1 not msgpack"  # an error result, in the same transaction
        if i % 100 == 3:
            route = [(k, v) for k, v in route if k != headers.REPLY_TO]  # a dead letter
            unanswerable.append(request_id)
        elif reply_to == "redis":
            to_redis.append(request_id)
        else:
            to_kafka.append(request_id)
        records.append((topic, request_id.encode(), body, route))
    await publish(kafka, records)

    await wait_committed(kafka, settings.worker.group_id, topic, timeout=60)
    results = await read_to_end(kafka, replies)
    letters = await read_to_end(kafka, dead_letters, key_of=None)
    assert sorted(results) == sorted(to_kafka)
    assert all(len(v) == 1 for v in results.values()), "a result committed twice"
    errors = [k for k, v in results.items() if v[0].headers[headers.STATUS] == b"error"]
    assert len(errors) == sum(1 for i in range(2_000) if i % 50 == 1 and i % 100 != 3)
    assert sorted(letters) == sorted(unanswerable)
    assert all(len(v) == 1 for v in letters.values())
    assert len(await read_redis(redis_url, to_redis)) == len(to_redis)


@contextlib.asynccontextmanager
async def _group_offsets(kafka: str, group: str) -> AsyncIterator[AIOKafkaConsumer]:
    """A consumer to read the group's committed offsets with (`committed()` asks the broker)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


async def _transactions(
    kafka: str, group: str, out: str
) -> tuple[AIOKafkaConsumer, Ledger, Transactions]:
    """`Transactions` for `group` as the worker makes them, dead letters to `out` (none are
    expected), with the consumer that reads the group's offsets (started) and their ledger."""
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka, group_id=group, enable_auto_commit=False)
    await consumer.start()
    ledger = Ledger(1000, 1 << 20)
    retry = RetryPolicy(out, 60, lambda exc: pytest.fail(repr(exc)))
    options = {"bootstrap_servers": kafka, "acks": "all", "enable_idempotence": True}
    transactions = Transactions(
        group, ledger, retry, options, lambda exc: pytest.fail(repr(exc)), consumer.committed
    )
    return consumer, ledger, transactions


def _ticket(tp: TopicPartition, offset: int, request_id: str) -> Ticket:
    return Ticket(
        tp=tp,
        offset=offset,
        key=request_id.encode(),
        value=b"{}",
        headers=[],
        request_id=request_id,
        model="mlp",
        version=None,
        reply_to=None,
        content_type="application/json",
        deadline_ms=None,
        received=time.monotonic(),
    )


def _first_commit_never_answered(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Make the next `commit_transaction` wait for ever, as on a coordinator that never
    answers (later ones commit); the event is set once it has begun."""
    unanswered = asyncio.Event()
    commit = AIOKafkaProducer.commit_transaction

    async def first_never_answered(producer: AIOKafkaProducer) -> None:
        if not unanswered.is_set():
            unanswered.set()
            await asyncio.Event().wait()
        await commit(producer)

    monkeypatch.setattr(AIOKafkaProducer, "commit_transaction", first_never_answered)
    return unanswered


class _Owners:
    """Workers' exactly-once sinks for one partition, as successive owners of it."""

    def __init__(
        self, kafka: str, group: str, tp: TopicPartition, out: str, offsets: AIOKafkaConsumer
    ) -> None:
        self.kafka, self.group, self.tp, self.out, self.offsets = kafka, group, tp, out, offsets
        self.crashes: list[BaseException] = []

    def owner(self) -> tuple[Transactions, Ledger]:
        ledger = Ledger(1000, 1 << 20)
        retry = RetryPolicy(self.out, 60, lambda exc: pytest.fail(repr(exc)))
        options = {"bootstrap_servers": self.kafka, "acks": "all", "enable_idempotence": True}
        transactions = Transactions(
            self.group, ledger, retry, options, self.crashes.append, self.offsets.committed
        )
        return transactions, ledger

    def answer(
        self, transactions: Transactions, ledger: Ledger, offset: int, request_id: str
    ) -> None:
        ticket = _ticket(self.tp, offset, request_id)
        ledger.admit(ticket)
        transactions.buffer(Write(ticket, self.out, b"result", [], dead_letter=False))


@contextlib.asynccontextmanager
async def _owners(kafka: str) -> AsyncIterator[_Owners]:
    """A source partition of its own, its results' topic, and its group's offsets."""
    run = uuid.uuid4().hex[:8]
    source, out, group = f"test.source.{run}", f"test.out.{run}", f"test-{run}"
    await create_topics(kafka, source, out, partitions=1)
    async with _group_offsets(kafka, group) as offsets:
        yield _Owners(kafka, group, TopicPartition(source, 0), out, offsets)


async def test_a_zombie_commits_nothing_once_its_partition_has_a_new_owner(kafka: str) -> None:
    async with _owners(kafka) as owners:
        tp = owners.tp
        zombie, zombie_ledger = owners.owner()
        await zombie.assign([tp])
        owners.answer(zombie, zombie_ledger, 0, "from-zombie")

        heir, heir_ledger = owners.owner()
        await heir.assign([tp])  # initialises the same transactional id: the zombie is fenced
        assert await zombie.commit({tp: 1}) == {}
        assert zombie_ledger.records == 0  # what it held is dropped, not leaked
        assert len(owners.crashes) == 1  # and the zombie restarts

        owners.answer(heir, heir_ledger, 0, "from-heir")
        assert await heir.commit({tp: 1}) == {tp: 1}
        assert heir_ledger.records == 0
        await zombie.close()
        await heir.close()
    assert sorted(await read_to_end(kafka, owners.out, key_of=None)) == ["from-heir"]


async def test_a_zombie_starting_its_producer_again_leaves_the_new_owner_alone(
    kafka: str,
) -> None:
    """Cut off, a worker lost its producer, and its partition went to a new owner that has
    committed since: the zombie sees that before it takes the id back, which would fence
    the new owner too and restart it for nothing."""
    async with _owners(kafka) as owners:
        tp = owners.tp
        zombie, zombie_ledger = owners.owner()
        await zombie.assign([tp])
        owners.answer(zombie, zombie_ledger, 0, "r0")
        assert await zombie.commit({tp: 1}) == {tp: 1}
        owners.answer(zombie, zombie_ledger, 1, "r1-zombie")
        await zombie._stop(zombie._partitions[tp])  # its producer lost to a network cut

        heir, heir_ledger = owners.owner()
        await heir.assign([tp])
        owners.answer(heir, heir_ledger, 1, "r1-heir")
        assert await heir.commit({tp: 2}) == {tp: 2}
        async with asyncio.timeout(10):  # the commit's markers reach the group's offsets
            while await owners.offsets.committed(tp) != 2:
                await asyncio.sleep(0.05)
        assert await zombie.commit({tp: 2}) == {}
        assert len(owners.crashes) == 1  # the zombie restarts

        owners.answer(heir, heir_ledger, 2, "r2-heir")
        assert await heir.commit({tp: 3}) == {tp: 3}  # not fenced by the zombie
        assert len(owners.crashes) == 1
        await zombie.close()
        await heir.close()
    results = sorted(await read_to_end(kafka, owners.out, key_of=None))
    assert results == ["r0", "r1-heir", "r2-heir"]


async def test_a_worker_of_the_former_id_scheme_is_fenced_as_the_partition_is_taken(
    kafka: str,
) -> None:
    """A rolling upgrade: the partition's last owner ran Surge 0.1 (id `<group>.<topic>.
    <partition>`) and is cut off with a transaction open. The new owner aborts it at once, so
    `read_committed` readers are not held up, and fences that worker."""
    async with _owners(kafka) as owners:
        tp = owners.tp
        former = AIOKafkaProducer(
            bootstrap_servers=kafka, transactional_id=f"{owners.group}.{tp.topic}.{tp.partition}"
        )
        await former.start()
        try:
            await former.begin_transaction()
            await (await former.send(owners.out, b"result", key=b"from-former-owner"))
            heir, heir_ledger = owners.owner()
            await heir.assign([tp])
            with pytest.raises(ProducerFenced):
                await former.commit_transaction()
        finally:
            await former.stop()
        owners.answer(heir, heir_ledger, 0, "from-heir")
        assert await heir.commit({tp: 1}) == {tp: 1}
        await heir.close()
        assert not owners.crashes
    results = await read_to_end(kafka, owners.out, key_of=None, timeout=10)
    assert sorted(results) == ["from-heir"]


async def test_groups_whose_former_ids_were_one_do_not_fence_each_other(kafka: str) -> None:
    """Group `g` reading topic `x.in` and group `g.x` reading `in` had one transactional id."""
    run = uuid.uuid4().hex[:8]
    out = f"test.out.{run}"
    pairs = [(f"test-{run}", f"x.in.{run}"), (f"test-{run}.x", f"in.{run}")]
    await create_topics(kafka, out, *(topic for _, topic in pairs), partitions=1)
    async with contextlib.AsyncExitStack() as stack:
        sinks = []
        for group, topic in pairs:
            offsets = await stack.enter_async_context(_group_offsets(kafka, group))
            owners = _Owners(kafka, group, TopicPartition(topic, 0), out, offsets)
            transactions, ledger = owners.owner()
            stack.push_async_callback(transactions.close)
            await transactions.assign([owners.tp])
            sinks.append((owners, transactions, ledger))
        for owners, transactions, ledger in sinks:
            owners.answer(transactions, ledger, 0, owners.group)
            assert await transactions.commit({owners.tp: 1}) == {owners.tp: 1}
            assert not owners.crashes
    results = await read_to_end(kafka, out, key_of=None)
    assert sorted(results) == sorted(group for group, _ in pairs)


async def test_a_worker_cut_off_while_its_partition_moved_does_not_take_it_back(
    kafka: str,
) -> None:
    async with _owners(kafka) as owners:
        tp = owners.tp
        cut_off, cut_off_ledger = owners.owner()
        await cut_off.assign([tp])
        owners.answer(cut_off, cut_off_ledger, 0, "r0")
        assert await cut_off.commit({tp: 1}) == {tp: 1}
        owners.answer(cut_off, cut_off_ledger, 1, "r1-cut-off")
        # Its next transaction fails (the network is gone): the producer goes with it. The
        # group moves the partition to a new owner, which answers and commits.
        await cut_off._stop(cut_off._partitions[tp])
        heir, heir_ledger = owners.owner()
        await heir.assign([tp])
        owners.answer(heir, heir_ledger, 1, "r1-heir")
        assert await heir.commit({tp: 2}) == {tp: 2}

        # Back on the network, still believing it owns the partition, it tries again.
        assert await cut_off.commit({tp: 2}) == {}
        assert len(owners.crashes) == 1  # it restarts and joins the group again
        assert cut_off_ledger.records == 0
        assert await owners.offsets.committed(tp) == 2
        await cut_off.close()
        await heir.close()
    results = await read_to_end(kafka, owners.out, key_of=None)
    assert sorted(results) == ["r0", "r1-heir"]


async def test_a_partition_leaves_without_waiting_for_a_transaction_that_cannot_end(
    kafka: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A revoked partition's transaction stuck (here its commit, as on a coordinator that
    never answers) is abandoned within seconds, not waited for past the rebalance; the next
    owner takes the id, which settles what was sent, and answers the request once."""
    unanswered = _first_commit_never_answered(monkeypatch)
    async with _owners(kafka) as owners:
        tp = owners.tp
        leaving, leaving_ledger = owners.owner()
        await leaving.assign([tp])
        owners.answer(leaving, leaving_ledger, 0, "r0")
        assert await leaving.commit({tp: 1}) == {}  # still running after its round
        assert unanswered.is_set()
        started = time.monotonic()
        await leaving.revoke([tp])
        assert time.monotonic() - started < 5  # the commit alone is bounded at 35 s
        assert leaving_ledger.records == 0

        heir, heir_ledger = owners.owner()
        assert await heir.assign([tp]) == {tp: None}  # nothing of it was committed
        owners.answer(heir, heir_ledger, 0, "r0")
        assert await heir.commit({tp: 1}) == {tp: 1}
        await leaving.close()
        await heir.close()
    assert len((await read_to_end(kafka, owners.out, key_of=None))["r0"]) == 1
    assert owners.crashes == []


async def test_a_partition_whose_id_cannot_be_taken_yet_holds_up_no_other(
    kafka: str,
    model_root: Path,
    run_worker: Callable[[Settings], Worker],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The transactional id of one assigned partition cannot be taken for a while (as when
    its previous owner's transaction waits for a partition that cannot take its markers):
    the other partitions are served meanwhile, the worker does not restart, and that one is
    served once its id is taken."""
    taken = asyncio.Event()
    fence_in = transactions_module._fence_in

    async def held_for_partition_0(producer: AIOKafkaProducer) -> None:
        if producer._txn_manager.transactional_id.endswith(":0"):
            await taken.wait()
        await fence_in(producer)

    monkeypatch.setattr(transactions_module, "_fence_in", held_for_partition_0)
    run = uuid.uuid4().hex[:8]
    replies = f"test.replies.{run}"
    settings = make_settings(kafka, model_root, None, SURGE_WORKER__DELIVERY="exactly_once")
    topic, group = settings.worker.topic_prefix + "mlp", settings.worker.group_id
    await create_topics(kafka, topic, replies)
    started = time.monotonic()
    worker = await run_worker(settings)
    x = {"x": np.ones((1, 32), np.float32)}
    route = request_headers(model="mlp", content_type=MSGPACK, reply_to=replies)
    ids = [f"{run}-{i}" for i in range(200)]
    await publish(kafka, [(topic, i.encode(), request_body(x, i, MSGPACK), route) for i in ids])
    await wait_committed(kafka, group, topic, timeout=60, only=[1, 2, 3])
    await asyncio.sleep(max(0.0, started + 15 - time.monotonic()))  # past the 10 s bound
    assert not worker.failed

    taken.set()
    await wait_committed(kafka, group, topic, timeout=60)
    results = await read_to_end(kafka, replies)
    assert sorted(results) == sorted(ids)
    assert all(len(found) == 1 for found in results.values())
    assert not worker.failed


async def test_a_worker_whose_outcomes_wait_on_a_transaction_that_cannot_end_restarts(
    kafka: str, model_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transaction wrote to a reply partition refusing every write: its abort cannot be
    written either, so its partition's outcomes stay in flight. Once they fill the bounds,
    every partition is paused: past 3 × reply_retry_s with nothing released, the worker
    restarts (its supervisor starts it again), handing them on uncommitted, instead of
    stopping every partition for as long as that one refuses."""
    run = uuid.uuid4().hex[:8]
    refusing, replies = f"test.refusing.{run}", f"test.replies.{run}"
    recovered = asyncio.Event()
    held: set[str] = set()
    send_batch = AIOKafkaProducer.send_batch
    fence_in = transactions_module._fence_in

    async def never_acknowledged(
        self: AIOKafkaProducer, batch: Any, topic: str, partition: int
    ) -> asyncio.Future[Any]:
        if topic != refusing or recovered.is_set():
            return await send_batch(self, batch, topic, partition=partition)
        held.add(self._txn_manager.transactional_id)  # its markers cannot be written either
        return asyncio.get_running_loop().create_future()

    async def held_while_refused(producer: AIOKafkaProducer) -> None:
        if producer._txn_manager.transactional_id in held:
            await recovered.wait()
        await fence_in(producer)

    monkeypatch.setattr(AIOKafkaProducer, "send_batch", never_acknowledged)
    monkeypatch.setattr(transactions_module, "_fence_in", held_while_refused)
    settings = make_settings(
        kafka,
        model_root,
        None,
        SURGE_WORKER__DELIVERY="exactly_once",
        SURGE_WORKER__REPLY_RETRY_S="2",
        SURGE_WORKER__MAX_IN_FLIGHT="300",
        SURGE_WORKER__SHUTDOWN_TIMEOUT_S="5",
    )
    topic = settings.worker.topic_prefix + "mlp"
    await create_topics(kafka, topic, replies, refusing)
    worker = Worker(settings)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.ready.wait(), 60)
        x = {"x": np.ones((1, 32), np.float32)}

        producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all")
        await producer.start()

        async def send(partition: int, name: str, count: int, reply_to: str) -> None:
            route = request_headers(model="mlp", content_type=MSGPACK, reply_to=reply_to)
            sent = [
                await producer.send(
                    topic,
                    request_body(x, i, MSGPACK),
                    key=i.encode(),
                    headers=route,
                    partition=partition,
                )
                for i in (f"{run}-{name}-{n}" for n in range(count))
            ]
            await asyncio.gather(*sent)

        try:  # partition 0 alone holds over half the bound, waiting on its transaction
            await send(0, "lost", 5, refusing)
            await send(0, "p0", 200, replies)
            await asyncio.sleep(5)  # its transaction has failed, and its next one hangs
            for partition in (1, 2, 3):
                await send(partition, f"p{partition}", 100, replies)
        finally:
            await producer.stop()
        await asyncio.wait_for(task, 60)  # it stopped itself
        assert worker.failed
    finally:
        recovered.set()
        worker.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 60)


async def test_a_transaction_raising_after_its_round_restarts_the_worker(
    kafka: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug raised in a transaction that outlived its commit round is not left to a "never
    retrieved" warning: the worker hears of it and restarts."""

    async def slow_then_broken(*_: object) -> bool:
        await asyncio.sleep(6)  # past the round's 5 s
        raise RuntimeError("a bug")

    monkeypatch.setattr(Transactions, "_transaction", slow_then_broken)
    async with _owners(kafka) as owners:
        transactions, ledger = owners.owner()
        await transactions.assign([owners.tp])
        owners.answer(transactions, ledger, 0, "r0")
        assert await transactions.commit({owners.tp: 1}) == {}
        assert owners.crashes == []
        await asyncio.sleep(2)
        assert [repr(exc) for exc in owners.crashes] == ["RuntimeError('a bug')"]
        await transactions.close()


async def test_results_are_invisible_until_their_offsets_commit(kafka: str) -> None:
    """Outcomes finished out of order wait for the settled prefix: a transaction never holds a
    result whose offset it does not commit."""
    run = uuid.uuid4().hex[:8]
    source, out, group = f"test.source.{run}", f"test.out.{run}", f"test-{run}"
    await create_topics(kafka, source, out, partitions=1)
    tp = TopicPartition(source, 0)
    ledger = Ledger(1000, 1 << 20)
    retry = RetryPolicy(out, 60, lambda exc: pytest.fail(repr(exc)))
    options = {"bootstrap_servers": kafka, "acks": "all", "enable_idempotence": True}
    offsets = AIOKafkaConsumer(bootstrap_servers=kafka, group_id=group, enable_auto_commit=False)
    await offsets.start()
    transactions = Transactions(
        group, ledger, retry, options, lambda exc: pytest.fail(repr(exc)), offsets.committed
    )
    await transactions.assign([tp])
    tickets = [_ticket(tp, offset, f"r{offset}") for offset in range(3)]
    for ticket in tickets:
        ledger.admit(ticket)
    for ticket in (tickets[2], tickets[0]):  # offset 1 still running
        transactions.buffer(Write(ticket, out, b"result", [], dead_letter=False))
    positions = ledger.offsets.committable()
    assert positions == {tp: 1}
    assert await transactions.commit(positions) == {tp: 1}
    assert sorted(await read_to_end(kafka, out, key_of=None)) == ["r0"]
    transactions.buffer(Write(tickets[1], out, b"result", [], dead_letter=False))
    assert await transactions.commit(ledger.offsets.committable()) == {tp: 3}
    assert sorted(await read_to_end(kafka, out, key_of=None)) == ["r0", "r1", "r2"]
    assert ledger.records == 0
    await transactions.close()
    await offsets.stop()


async def test_a_commit_whose_answer_was_lost_is_not_sent_again(kafka: str) -> None:
    run = uuid.uuid4().hex[:8]
    source, out, group = f"test.source.{run}", f"test.out.{run}", f"test-{run}"
    await create_topics(kafka, source, out, partitions=1)
    tp = TopicPartition(source, 0)
    consumer, ledger, transactions = await _transactions(kafka, group, out)
    await transactions.assign([tp])
    ticket = _ticket(tp, 0, "r0")
    ledger.admit(ticket)
    transactions.buffer(Write(ticket, out, b"result", [], dead_letter=False))
    assert await transactions.commit({tp: 1}) == {tp: 1}

    # As if the commit's answer had been lost: the results still held, the producer reset.
    state = transactions._partitions[tp]
    state.writes.append(Write(ticket, out, b"result", [], dead_letter=False))
    state.uncertain = 1
    ledger.records += 1  # held again, so counted in flight again
    await transactions._stop(state)
    assert await transactions.commit({tp: 1}) == {tp: 1}
    assert len((await read_to_end(kafka, out, key_of=None))["r0"]) == 1
    assert ledger.records == 0
    await transactions.close()
    await consumer.stop()


async def test_a_commit_never_answered_is_given_up_and_its_results_go_out_once(
    kafka: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A coordinator that never answers a commit holds the partition no longer than the send
    limit: its producer is replaced (which aborts the transaction) and the results go out in
    the next one, once."""
    run = uuid.uuid4().hex[:8]
    source, out, group = f"test.source.{run}", f"test.out.{run}", f"test-{run}"
    await create_topics(kafka, source, out, partitions=1)
    tp = TopicPartition(source, 0)
    unanswered = _first_commit_never_answered(monkeypatch)
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka, group_id=group, enable_auto_commit=False)
    await consumer.start()
    ledger = Ledger(1000, 1 << 20)
    retry = RetryPolicy(out, 60, lambda exc: pytest.fail(repr(exc)))
    options = {
        "bootstrap_servers": kafka,
        "acks": "all",
        "enable_idempotence": True,
        "request_timeout_ms": 2000,  # a send limit of 7 s
    }
    transactions = Transactions(
        group, ledger, retry, options, lambda exc: pytest.fail(repr(exc)), consumer.committed
    )
    try:
        await transactions.assign([tp])
        ticket = _ticket(tp, 0, "r0")
        ledger.admit(ticket)
        transactions.buffer(Write(ticket, out, b"result", [], dead_letter=False))
        give_up_at = time.monotonic() + 40
        while ledger.records and time.monotonic() < give_up_at:
            await transactions.commit(ledger.offsets.committable())
            await asyncio.sleep(0.5)  # a round with its partition's transaction still running
        assert unanswered.is_set()
        assert ledger.records == 0
        assert len((await read_to_end(kafka, out, key_of=None))["r0"]) == 1
    finally:
        await asyncio.wait_for(transactions.close(), 30)  # waits for a commit still running
        await consumer.stop()


async def test_a_batch_of_two_input_partitions_commits_each_part_with_its_partition(
    kafka: str,
) -> None:
    """A batch's results, as `Records`, held for two input partitions' transactions: each
    transaction carries the results of the offsets it commits, a part cut where its position
    falls, and every result comes out once."""
    run = uuid.uuid4().hex[:8]
    source, out, group = f"test.source.{run}", f"test.out.{run}", f"test-{run}"
    await create_topics(kafka, source, out, partitions=2)
    first, second = TopicPartition(source, 0), TopicPartition(source, 1)
    consumer, ledger, transactions = await _transactions(kafka, group, out)
    try:
        await transactions.assign([first, second])
        batch = Records(out)
        for offset in range(10):  # interleaved, as a batch takes them
            for tp in (first, second):
                ticket = _ticket(tp, offset, f"{tp.partition}-{offset}")
                ledger.admit(ticket)
                batch.add(Write(ticket, out, b"result", [], dead_letter=False))
        batch.writes = [None] * len(batch)  # first attempts, as `Replies` hands them over
        transactions.buffer(batch)

        assert await transactions.commit({first: 4}) == {first: 4}
        assert sorted(await read_to_end(kafka, out, key_of=None)) == [f"0-{i}" for i in range(4)]
        assert ledger.records == 16
        assert await transactions.commit({first: 10, second: 10}) == {first: 10, second: 10}
        results = await read_to_end(kafka, out, key_of=None)
        assert sorted(results) == sorted(f"{p}-{i}" for p in (0, 1) for i in range(10))
        assert all(len(copies) == 1 for copies in results.values())
        assert ledger.records == 0
    finally:
        await transactions.close()
        await consumer.stop()


@pytest.mark.parametrize("as_batch", [False, True], ids=["writes", "records"])
async def test_results_over_a_topic_limit_only_together_go_again_one_by_one(
    kafka: str, as_batch: bool
) -> None:
    """A record batch over the reply topic's max.message.bytes aborts its transaction; the next
    one sends each result alone, and none becomes a dead letter: results buffered one by one,
    or as one batch's `Records`."""
    run = uuid.uuid4().hex[:8]
    source, out, dead, group = f"test.source.{run}", f"test.small.{run}", f"test.dead.{run}", run
    await create_topics(kafka, out, partitions=1, configs={"max.message.bytes": "20000"})
    await create_topics(kafka, source, dead, partitions=1)
    tp = TopicPartition(source, 0)
    ledger = Ledger(1000, 1 << 30)
    retry = RetryPolicy(dead, 60, lambda exc: pytest.fail(repr(exc)))
    options = {
        "bootstrap_servers": kafka,
        "acks": "all",
        "enable_idempotence": True,
        "max_batch_size": 256 * 1024,  # as the worker's
    }
    offsets = AIOKafkaConsumer(bootstrap_servers=kafka, group_id=group, enable_auto_commit=False)
    await offsets.start()
    transactions = Transactions(
        group, ledger, retry, options, lambda exc: pytest.fail(repr(exc)), offsets.committed
    )
    try:
        await transactions.assign([tp])
        batch = Records(out)
        for offset in range(100):
            ticket = _ticket(tp, offset, f"r{offset}")
            ledger.admit(ticket)
            write = Write(ticket, out, b"x" * 1000, [], dead_letter=False)
            if as_batch:
                batch.add(write)
            else:
                transactions.buffer(write)
        if as_batch:
            batch.writes = [None] * len(batch)  # first attempts, as `Replies` hands them over
            transactions.buffer(batch)
        for _ in range(5):  # the first commit fails whole; the next sends them one by one
            await transactions.commit(ledger.offsets.committable())
            if not ledger.records:
                break
        assert ledger.records == 0
        assert len(await read_to_end(kafka, out, key_of=None)) == 100
        assert not await read_to_end(kafka, dead, key_of=None, timeout=5)
    finally:
        await transactions.close()
        await offsets.stop()


async def test_partitions_not_fenced_in_are_neither_read_nor_committed(kafka: str) -> None:
    """Fencing a new partition failed (the coordinator away, the previous owner's commit
    running past the limit): the worker restarts, and meanwhile reads nothing of it and
    commits nothing for it, which would answer again what the previous owner answered and
    move the group's offset back."""
    run = uuid.uuid4().hex[:8]
    source, out, group = f"test.source.{run}", f"test.out.{run}", f"test-{run}"
    await create_topics(kafka, source, out, partitions=1)
    tp = TopicPartition(source, 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka, group_id=group, enable_auto_commit=False)
    await consumer.start()
    consumer.assign([tp])
    ledger = Ledger(1000, 1 << 20)
    crashes: list[BaseException] = []
    reachable = False

    async def committed(partition: TopicPartition) -> int | None:
        if not reachable:
            raise GroupCoordinatorNotAvailableError()
        return await consumer.committed(partition)

    retry = RetryPolicy(out, 60, crashes.append)
    options = {"bootstrap_servers": kafka, "acks": "all", "enable_idempotence": True}
    transactions = Transactions(group, ledger, retry, options, crashes.append, committed)
    worker = SimpleNamespace(
        _consumer=consumer,
        _transactions=transactions,
        _held=set(),
        _fencing={},
        _ledger=ledger,
        _crashed=crashes.append,
    )
    try:
        await _Rebalance(worker).on_partitions_assigned({tp})  # type: ignore[arg-type]
        assert len(crashes) == 1  # it restarts and joins the group again
        assert consumer.paused() == {tp}
        assert worker._held == {tp}  # the consume loop resumes no held partition

        reachable = True  # by the time the worker's last commit runs
        ticket = _ticket(tp, 0, "r0")  # as if a fetch had read it anyway
        ledger.admit(ticket)
        transactions.buffer(Write(ticket, out, b"result", [], dead_letter=False))
        assert await transactions.commit({tp: 1}) == {}
        assert ledger.records == 0
        assert not await read_to_end(kafka, out, key_of=None, timeout=3)
        assert await consumer.committed(tp) is None
    finally:
        await transactions.close()
        await consumer.stop()
