"""On a cluster that creates topics only on request (most production ones), a result bound
for a reply topic that does not exist becomes a `reply_failed` dead letter, and the results of
every other request of the same partitions are written and committed, in both delivery modes."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from surge.config import Settings
from surge.producers import request_body, request_headers
from surge.schemas import MSGPACK, ErrorCode, headers
from surge.workers import Worker
from surge.workers.writes import TopicLookup
from tests.conftest import make_settings
from tests.helpers import create_topics, publish, read_to_end, read_topic, wait_committed

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
async def test_results_for_a_missing_reply_topic_are_dead_lettered(
    strict_kafka: str,
    model_root: Path,
    run_worker: Callable[[Settings], Worker],
    delivery: str,
) -> None:
    run = uuid.uuid4().hex[:8]
    replies, missing, dead_letters = f"test.replies.{run}", f"test.missing.{run}", f"dlq.{run}"
    settings = make_settings(
        strict_kafka,
        model_root,
        None,
        SURGE_WORKER__DELIVERY=delivery,
        SURGE_WORKER__DEAD_LETTER_TOPIC=dead_letters,
        SURGE_WORKER__REPLY_RETRY_S="10",  # past a new topic's first leader election
        SURGE_WORKER__GROUP_ID=f"strict-{run}",
    )
    topic = settings.worker.topic_prefix + "mlp"
    await create_topics(strict_kafka, topic, replies, dead_letters)
    await run_worker(settings)

    body = {"x": np.ones((1, 32), np.float32)}
    answerable, lost = [], []
    records = []
    for i in range(400):
        request_id = f"{run}-{i}"
        reply_to = missing if i % 40 == 7 else replies
        (lost if reply_to == missing else answerable).append(request_id)
        route = request_headers(model="mlp", content_type=MSGPACK, reply_to=reply_to)
        records.append((topic, request_id.encode(), request_body(body, request_id, MSGPACK), route))
    await publish(strict_kafka, records)

    await wait_committed(strict_kafka, settings.worker.group_id, topic, timeout=90)
    results = await read_to_end(strict_kafka, replies)
    letters = await read_to_end(strict_kafka, dead_letters, key_of=None)
    assert sorted(results) == sorted(answerable)
    assert all(len(v) == 1 for v in results.values())
    assert sorted(letters) == sorted(lost)
    codes = {v[0].headers[headers.ERROR_CODE] for v in letters.values()}
    assert codes == {ErrorCode.REPLY_FAILED.encode()}


async def test_a_topic_deleted_since_it_was_found_is_missing_when_asked_afresh(
    strict_kafka: str,
) -> None:
    """A client's own reply topic goes with the client: a result that failed on it asks the
    cluster again, instead of trusting what was found before."""
    topic = f"test.replies.{uuid.uuid4().hex[:8]}"
    await create_topics(strict_kafka, topic)
    lookup = TopicLookup({"bootstrap_servers": strict_kafka}, wait_s=3)
    admin = AIOKafkaAdminClient(bootstrap_servers=strict_kafka)
    await admin.start()
    try:
        assert await lookup.exists(topic)
        await admin.delete_topics([topic])
        assert await lookup.exists(topic)  # as found: no round trip for every result
        deadline = asyncio.get_running_loop().time() + 30
        while await lookup.exists(topic, fresh=True):  # the deletion takes a moment
            assert asyncio.get_running_loop().time() < deadline, "still found after deletion"
        assert not await lookup.exists(topic)
    finally:
        await admin.close()
        await lookup.close()


async def test_a_request_topic_deleted_under_way_holds_up_no_other_topics_commits(
    strict_kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    """A commit naming a partition of a topic deleted meanwhile is answered "unknown topic",
    which aiokafka retries for as long as it lasts: cut off, it leaves the next commit, of
    the other topics' partitions, to go ahead."""
    run = uuid.uuid4().hex[:8]
    own, shared, replies = f"test.own.{run}", f"test.shared.{run}", f"test.replies.{run}"
    settings = make_settings(
        strict_kafka,
        model_root,
        None,
        SURGE_WORKER__TOPICS=json.dumps({"mlp": own}),
        SURGE_WORKER__SHARED_TOPICS=json.dumps([shared]),
        SURGE_WORKER__CREATE_TOPICS="false",
        SURGE_WORKER__COMMIT_INTERVAL_MS="3000",  # a result settled now is committed later
        SURGE_WORKER__GROUP_ID=f"deleted-{run}",
    )
    group = settings.worker.group_id
    await create_topics(strict_kafka, own, shared, replies, partitions=1)
    await run_worker(settings)
    route = request_headers(model="mlp", content_type=MSGPACK, reply_to=replies)
    x = {"x": np.ones((1, 32), np.float32)}

    async def send(topic: str, count: int) -> None:
        ids = [uuid.uuid4().hex for _ in range(count)]
        await publish(
            strict_kafka, [(topic, None, request_body(x, i, MSGPACK), route) for i in ids]
        )

    await send(own, 1)
    await send(shared, 1)
    await wait_committed(strict_kafka, group, own, timeout=60)
    await wait_committed(strict_kafka, group, shared, timeout=60)
    await send(own, 1)
    await read_topic(strict_kafka, replies, until=3, key_of=None)
    admin = AIOKafkaAdminClient(bootstrap_servers=strict_kafka)
    await admin.start()
    try:  # answered, not yet committed: its topic goes before the commit does
        await admin.delete_topics([own])
    finally:
        await admin.close()
    await send(shared, 5)
    await wait_committed(strict_kafka, group, shared, timeout=45)


async def test_results_for_many_missing_reply_topics_in_one_transaction_are_dead_lettered(
    strict_kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    """Exactly once: each missing topic takes a while to be found missing; looked up one
    after another, a dozen of them outlasted the transaction's time limit at every round,
    and their partition was never committed again."""
    run = uuid.uuid4().hex[:8]
    dead_letters = f"dlq.{run}"
    settings = make_settings(
        strict_kafka,
        model_root,
        None,
        SURGE_WORKER__DELIVERY="exactly_once",
        SURGE_WORKER__DEAD_LETTER_TOPIC=dead_letters,
        SURGE_WORKER__GROUP_ID=f"many-missing-{run}",
        SURGE_KAFKA__REQUEST_TIMEOUT_MS="5000",  # a transaction's sends: 10 s at most
    )
    topic = settings.worker.topic_prefix + "mlp"
    await create_topics(strict_kafka, topic, dead_letters, partitions=1)
    await run_worker(settings)
    x = {"x": np.ones((1, 32), np.float32)}
    records = []
    for i in range(12):  # each to a reply topic of its own, gone with its client
        route = request_headers(model="mlp", content_type=MSGPACK, reply_to=f"gone.{run}.{i}")
        records.append((topic, None, request_body(x, f"{run}-{i}", MSGPACK), route))
    await publish(strict_kafka, records)
    await wait_committed(strict_kafka, settings.worker.group_id, topic, timeout=60)
    letters = await read_to_end(strict_kafka, dead_letters, key_of=None)
    assert len(letters) == 12
