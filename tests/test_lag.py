"""A worker group's lag on real Kafka: records not committed, and how old the oldest is."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from aiokafka.structs import OffsetAndMetadata

from surge.workers.lag import group_lag
from tests.helpers import create_topics
from tests.services import KafkaBroker, free_port
from tests.test_cli import surge

pytestmark = pytest.mark.integration


async def test_lag_counts_what_is_not_committed_and_ages_the_oldest_record(kafka: str) -> None:
    run = uuid.uuid4().hex[:8]
    busy, idle, missing, group = f"test.lag.{run}", f"test.idle.{run}", f"test.none.{run}", run
    await create_topics(kafka, busy, idle, partitions=2)
    producer = AIOKafkaProducer(bootstrap_servers=kafka)
    await producer.start()
    sent = time.time()
    for i in range(10):
        await producer.send_and_wait(busy, b"x", partition=i % 2)  # 5 per partition
    for _ in range(4):
        await producer.send_and_wait(idle, b"x", partition=0)
    await producer.stop()
    await asyncio.sleep(1.0)  # the oldest waiting record is at least this old
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka, group_id=group, enable_auto_commit=False)
    await consumer.start()
    consumer.assign([TopicPartition(busy, 0), TopicPartition(busy, 1)])
    # Partition 0 committed up to its end, partition 1 from its third record; nothing of the
    # idle topic was ever committed: all of it waits.
    await consumer.commit({TopicPartition(busy, 0): OffsetAndMetadata(5, "")})
    await consumer.commit({TopicPartition(busy, 1): OffsetAndMetadata(2, "")})
    await consumer.stop()

    lags = {lag.topic: lag for lag in await group_lag({"bootstrap_servers": kafka}, group)}
    assert sorted(lags) == [busy]  # the topics it committed offsets for
    assert (lags[busy].partitions, lags[busy].records) == (2, 3)
    assert lags[busy].oldest_s is not None
    assert 1.0 <= lags[busy].oldest_s <= time.time() - sent + 1

    named = await group_lag({"bootstrap_servers": kafka}, group, [busy, idle, missing])
    assert [(lag.topic, lag.partitions, lag.records) for lag in named] == [
        (idle, 2, 4),
        (busy, 2, 3),
        (missing, 0, 0),  # not created by asking
    ]
    assert named[0].oldest_s is not None
    assert named[2].oldest_s is None
    assert [lag.uncommitted for lag in named] == [2, 0, 0]

    # A group resetting to `latest` starts a partition it never committed at its end.
    latest = await group_lag({"bootstrap_servers": kafka}, group, [idle, busy], reset="latest")
    assert [(lag.records, lag.oldest_s, lag.uncommitted) for lag in latest] == [
        (0, None, 2),
        (3, latest[1].oldest_s, 0),
    ]
    assert latest[1].oldest_s is not None

    # Waiting records whose age was not read in time: unknown, not "none waiting".
    unread = await group_lag({"bootstrap_servers": kafka}, group, [busy], read_s=0.0)
    assert [(lag.records, lag.oldest_s, lag.age_unknown) for lag in unread] == [(3, None, True)]


async def test_surge_lag_prints_a_group_s_topics(kafka: str) -> None:
    run = uuid.uuid4().hex[:8]
    topic = f"test.lag.{run}"
    await create_topics(kafka, topic, partitions=1)
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka, group_id=run, enable_auto_commit=False)
    await consumer.start()
    consumer.assign([TopicPartition(topic, 0)])
    await consumer.commit({TopicPartition(topic, 0): OffsetAndMetadata(0, "")})
    await consumer.stop()
    shown = await asyncio.to_thread(surge, "lag", "--group", run, "--bootstrap", kafka, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == {
        "topic": topic,
        "partitions": 1,
        "records": 0,
        "oldest_s": None,
        "age_unknown": False,
        "uncommitted": 0,
    }
    unreachable = surge("lag", "--group", run, "--bootstrap", f"127.0.0.1:{free_port()}")
    assert unreachable.returncode == 2
    assert "Traceback" not in unreachable.stderr


async def test_surge_lag_says_when_a_group_has_committed_nothing(kafka: str) -> None:
    group = f"test.never.{uuid.uuid4().hex[:8]}"
    shown = await asyncio.to_thread(surge, "lag", "--group", group, "--bootstrap", kafka)
    assert shown.returncode == 0, shown.stderr
    assert f"group '{group}' has committed no offsets" in shown.stderr


async def test_surge_lag_follows_the_reset_policy_of_the_settings(
    kafka: str, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:8]
    topic = f"test.lag.{run}"
    await create_topics(kafka, topic, partitions=2)
    producer = AIOKafkaProducer(bootstrap_servers=kafka)
    await producer.start()
    for partition in (0, 1):
        await producer.send_and_wait(topic, b"x", partition=partition)
    await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka, group_id=run, enable_auto_commit=False)
    await consumer.start()
    consumer.assign([TopicPartition(topic, 0)])
    await consumer.commit({TopicPartition(topic, 0): OffsetAndMetadata(1, "")})
    await consumer.stop()
    config = tmp_path / "worker.toml"
    config.write_text(f'[kafka]\nbootstrap_servers = "{kafka}"\n[worker]\n')
    group = ("--config", str(config), "--group", run)

    earliest = await asyncio.to_thread(surge, "lag", *group)
    assert earliest.returncode == 0, earliest.stderr
    assert "nothing committed: 1, counted from the log's start" in earliest.stdout
    assert re.search(rf"{re.escape(topic)} .* 2 .* 1 ", earliest.stdout), earliest.stdout

    config.write_text(config.read_text() + 'auto_offset_reset = "latest"\n')
    latest = await asyncio.to_thread(surge, "lag", *group)
    assert latest.returncode == 0, latest.stderr
    assert "counted as 0 waiting (auto_offset_reset = latest)" in latest.stdout
    assert re.search(rf"{re.escape(topic)} .* 2 .* 0 ", latest.stdout), latest.stdout


async def test_lag_on_a_cluster_just_started_waits_for_its_group_coordinator() -> None:
    """A fresh cluster answers the first group request "coordinator not available" while it
    creates its offsets topic: asked again, not reported as a failure."""
    broker = await asyncio.to_thread(KafkaBroker().start)
    try:
        assert await group_lag({"bootstrap_servers": broker.bootstrap}, "fresh") == []
    finally:
        await asyncio.to_thread(broker.close)


async def _commit(kafka: str, group: str, offsets: dict[TopicPartition, int]) -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(list(offsets))
        await consumer.commit({tp: OffsetAndMetadata(o, "") for tp, o in offsets.items()})
    finally:
        await consumer.stop()


async def test_lag_reads_transactional_requests_as_the_workers_do(kafka: str) -> None:
    run = uuid.uuid4().hex[:8]
    topic, group = f"test.txn.{run}", run
    await create_topics(kafka, topic, partitions=3)
    producer = AIOKafkaProducer(bootstrap_servers=kafka, transactional_id=f"test-lag-{run}")
    await producer.start()
    try:
        async with producer.transaction():  # offsets 0-2, its commit marker at 3
            for _ in range(3):
                await producer.send(topic, b"x", partition=0)
        await producer.begin_transaction()
        for partition in (1, 2):
            await producer.send(topic, b"aborted", partition=partition)
        await producer.abort_transaction()
        await asyncio.sleep(2.0)
        async with producer.transaction():
            await producer.send(topic, b"x", partition=2)
    finally:
        await producer.stop()
    # Partition 0 answered in full: committed after its last record, before the marker.
    await _commit(kafka, group, {TopicPartition(topic, 0): 3})

    [lag] = await group_lag({"bootstrap_servers": kafka}, group, [topic])
    # Partition 1 holds an aborted record and a marker only: nothing waits. Partition 2 waits
    # from its start (4 offsets: aborted record, marker, record, marker), aged by its record.
    assert (lag.records, lag.age_unknown, lag.uncommitted) == (4, False, 2)
    assert lag.oldest_s is not None
    assert lag.oldest_s < 2.0

    [done] = await group_lag({"bootstrap_servers": kafka}, group, [topic], reset="latest")
    assert (done.records, done.oldest_s, done.age_unknown) == (0, None, False)


async def _five_records(kafka: str) -> tuple[str, str]:
    """A topic of one partition holding five records, and a group name of its own."""
    run = uuid.uuid4().hex[:8]
    topic = f"test.lag.{run}"
    await create_topics(kafka, topic, partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka)
    await producer.start()
    for _ in range(5):
        await producer.send_and_wait(topic, b"x", partition=0)
    await producer.stop()
    return topic, run


async def _committed_then_lost_to_retention(kafka: str) -> tuple[str, str]:
    """Five records, the group committed at 1, then the records below 3 deleted."""
    topic, group = await _five_records(kafka)
    tp = TopicPartition(topic, 0)
    await _commit(kafka, group, {tp: 1})
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        await admin.delete_records({tp: RecordsToDelete(before_offset=3)})
    finally:
        await admin.close()
    return topic, group


async def test_lag_of_an_offset_lost_to_retention_follows_the_reset_policy(kafka: str) -> None:
    topic, group = await _committed_then_lost_to_retention(kafka)

    kafka_options = {"bootstrap_servers": kafka}
    [earliest] = await group_lag(kafka_options, group, [topic], reset="earliest")
    assert (earliest.records, earliest.uncommitted) == (2, 0)  # from the log's start
    [latest] = await group_lag(kafka_options, group, [topic], reset="latest")
    assert (latest.records, latest.oldest_s, latest.uncommitted) == (0, None, 0)  # its end


async def test_records_lost_to_retention_while_lag_is_read_still_count_as_waiting(
    kafka: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The log start moves past the committed offset between finding it and reading there:
    the fetch resets as the group's own would, to the new start, not to the end."""
    topic, group = await _committed_then_lost_to_retention(kafka)

    async def as_before(self: AIOKafkaConsumer, partitions: list[TopicPartition]) -> dict:
        return dict.fromkeys(partitions, 0)  # read before the deletion: 1 is still held

    monkeypatch.setattr(AIOKafkaConsumer, "beginning_offsets", as_before)
    [lag] = await group_lag({"bootstrap_servers": kafka}, group, [topic], reset="earliest")
    assert lag.records > 0
    assert lag.oldest_s is not None  # the first record left, at offset 3, was read


async def test_lag_of_an_offset_past_the_log_s_end_follows_the_reset_policy(kafka: str) -> None:
    """An offset the log lost the records below (an unclean election, say): the group's
    consumers reset, and read what the policy says they will."""
    topic, group = await _five_records(kafka)
    await _commit(kafka, group, {TopicPartition(topic, 0): 50})
    kafka_options = {"bootstrap_servers": kafka}
    [earliest] = await group_lag(kafka_options, group, [topic], reset="earliest")
    assert earliest.records == 5  # every record, from the log's start
    [latest] = await group_lag(kafka_options, group, [topic], reset="latest")
    assert latest.records == 0


async def test_an_offset_within_an_open_transaction_waits_there_and_is_not_reset(
    kafka: str,
) -> None:
    """Past the last stable offset but within the log (a group reset to the log's end while a
    transaction is open): the workers wait there, and nothing below it is waiting."""
    topic, group = await _five_records(kafka)
    tp = TopicPartition(topic, 0)
    producer = AIOKafkaProducer(bootstrap_servers=kafka, transactional_id=f"test-lag-{group}")
    await producer.start()
    try:
        await producer.begin_transaction()
        for _ in range(3):  # offsets 5-7, open: the last stable offset stays at 5
            await producer.send_and_wait(topic, b"open", partition=0)
        await _commit(kafka, group, {tp: 7})
        [lag] = await group_lag({"bootstrap_servers": kafka}, group, [topic], reset="earliest")
        assert (lag.records, lag.oldest_s, lag.uncommitted) == (0, None, 0)
    finally:
        await producer.abort_transaction()
        await producer.stop()


async def test_surge_lag_shows_configured_topics_the_group_has_not_committed_on(
    kafka: str, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:8]
    committed, mapped, shared = f"test.lag.{run}", f"test.mapped.{run}", f"test.shared.{run}"
    prefix = f"test.model.{run}."
    (tmp_path / "models" / "found").mkdir(parents=True)
    await create_topics(kafka, committed, mapped, shared, prefix + "found", partitions=2)
    producer = AIOKafkaProducer(bootstrap_servers=kafka)
    await producer.start()
    for i in range(3):
        await producer.send_and_wait(mapped, b"x", partition=i % 2)
    await producer.stop()
    await _commit(kafka, run, {TopicPartition(committed, 0): 0})
    config = tmp_path / "worker.toml"
    config.write_text(
        f'[kafka]\nbootstrap_servers = "{kafka}"\n'
        f'[worker]\ngroup_id = "{run}"\nmodel_root = "{tmp_path / "models"}"\n'
        f'topic_prefix = "{prefix}"\nshared_topics = ["{shared}", "test.absent.{run}"]\n'
        f'[worker.topics]\nnew_model = "{mapped}"\n'
    )

    shown = await asyncio.to_thread(surge, "lag", "--config", str(config), "--json")
    assert shown.returncode == 0, shown.stderr
    lags = [json.loads(line) for line in shown.stdout.splitlines()]
    # Those that exist: the absent one is neither shown nor created.
    assert [(lag["topic"], lag["records"], lag["uncommitted"]) for lag in lags] == [
        (committed, 0, 1),
        (mapped, 3, 2),
        (prefix + "found", 0, 2),
        (shared, 0, 2),
    ]
    assert lags[1]["oldest_s"] is not None


def _stop_java_of(workdir: str) -> None:
    """Kill a broker left running with this log directory, by its process id."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            command = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if workdir.encode() in command:
            os.kill(int(proc.name), signal.SIGKILL)


def _state(pid: int) -> str:
    """What a process is doing, as the kernel sees it (state and wait channel)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        wchan = Path(f"/proc/{pid}/wchan").read_text()
    except OSError as exc:
        return repr(exc)
    return f"{next(line for line in status if line.startswith('State'))}, waiting in {wchan}"


def test_a_broker_run_from_the_command_line_stops_on_sigterm() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.services", "kafka"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    workdir = ""
    try:
        started = process.stdout.readline()  # type: ignore[union-attr]
        found = re.search(r" on [\d.]+:(\d+) \(log dir (\S+)\)", started)
        assert found, started
        port, workdir = int(found[1]), found[2]
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(60) == 0
        except subprocess.TimeoutExpired:  # say where it stood: the log dir is removed after
            log = Path(workdir, "broker.log")
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
            raise AssertionError(
                f"still running 60 s after SIGTERM; {_state(process.pid)}; broker log:\n{tail}"
            ) from None
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
            pass
        assert not Path(workdir).exists()
    finally:
        process.kill()
        process.wait()
        if workdir:
            _stop_java_of(workdir)
