"""`surge dlq inspect` summarises a dead-letter topic; `surge dlq replay` re-publishes the
chosen records to their source topic once the cause is fixed, never twice for one request."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from redis.asyncio import Redis

from surge.config import Settings
from surge.producers import dead_letters as dlq
from surge.producers import request_body, request_headers
from surge.producers.dead_letters import DeadLetter, TopicUnreadable, read_all, read_to_end
from surge.schemas import MSGPACK, headers
from surge.workers import Worker
from tests.conftest import make_settings
from tests.helpers import create_topics, publish, read_topic
from tests.helpers import read_to_end as read_results
from tests.services import free_port
from tests.test_cli import surge

pytestmark = pytest.mark.integration


async def _dead_letter_lost_requests(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker], count: int
) -> tuple[str, str]:
    """Publish `count` requests without surge-reply-to, which a worker dead-letters:
    (run, dead-letter topic). Request ids are `{run}-{i}`."""
    run = uuid.uuid4().hex[:8]
    dead_letters = f"test.dlq.{run}"
    settings = make_settings(kafka, model_root, None, SURGE_WORKER__DEAD_LETTER_TOPIC=dead_letters)
    topic = settings.worker.topic_prefix + "mlp"
    await create_topics(kafka, topic, dead_letters)
    await run_worker(settings)
    x = {"x": np.ones((1, 32), np.float32)}
    lost = [
        (
            topic,
            f"{run}-{i}".encode(),
            request_body(x, f"{run}-{i}", MSGPACK),
            request_headers(model="mlp", content_type=MSGPACK, reply_to=None),
        )
        for i in range(count)
    ]
    await publish(kafka, lost)
    await read_topic(kafka, dead_letters, until=count, key_of=None)
    return run, dead_letters


async def test_inspect_then_replay_once(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    run, dead_letters = await _dead_letter_lost_requests(kafka, model_root, run_worker, 20)
    replies = f"test.replies.{run}"
    await create_topics(kafka, replies)

    inspect = surge("dlq", "inspect", "--topic", dead_letters, "--bootstrap", kafka)
    assert inspect.returncode == 0, inspect.stderr
    assert re.search(r"invalid_reply_to\s*│\s*20\s*│\s*0\s*│", inspect.stdout), inspect.stdout

    common = (
        "--topic",
        dead_letters,
        "--bootstrap",
        kafka,
        "--reason",
        "invalid_reply_to",
        "--reply-to",
        replies,
    )
    dry = surge("dlq", "replay", *common, "--dry-run")
    assert "would replay 20" in dry.stdout, dry.stdout + dry.stderr
    first = surge("dlq", "replay", *common)
    assert "replayed 20" in first.stdout, first.stdout + first.stderr
    results = await read_topic(kafka, replies, until=20)
    assert sorted(results) == sorted(f"{run}-{i}" for i in range(20))

    again = surge("dlq", "replay", *common)  # the cause is fixed and they are answered
    assert "replayed 0" in again.stdout
    assert "20 already answered" in again.stdout
    none = surge("dlq", "replay", *common[:4], "--reason", "model_error")
    assert "selected 0" in none.stdout


async def test_replay_elsewhere_skips_requests_answered_where_they_first_asked(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    """A reply topic the worker refuses (here by its pattern) dead-letters the request; one
    answered there meanwhile (by an earlier replay, say) must not run again elsewhere."""
    run = uuid.uuid4().hex[:8]
    dead_letters, first, other = f"test.dlq.{run}", f"first.{run}", f"test.replies.{run}"
    settings = make_settings(
        kafka,
        model_root,
        None,
        SURGE_WORKER__DEAD_LETTER_TOPIC=dead_letters,
        SURGE_WORKER__REPLY_TOPIC_PATTERN=r"test\..*",
    )
    topic = settings.worker.topic_prefix + "mlp"
    await create_topics(kafka, topic, dead_letters, first, other)
    await run_worker(settings)
    x = {"x": np.ones((1, 32), np.float32)}
    ids = [f"{run}-{i}" for i in range(4)]
    route = request_headers(model="mlp", content_type=MSGPACK, reply_to=first)
    await publish(kafka, [(topic, i.encode(), request_body(x, i, MSGPACK), route) for i in ids])
    await read_topic(kafka, dead_letters, until=4, key_of=None)
    answered = [(headers.REQUEST_ID, ids[0].encode()), (headers.STATUS, b"ok")]
    await publish(kafka, [(first, ids[0].encode(), b"", answered)])

    out = surge("dlq", "replay", "--topic", dead_letters, "--bootstrap", kafka, "--reply-to", other)
    assert "replayed 3" in out.stdout, out.stdout + out.stderr
    assert "1 already answered" in out.stdout
    assert sorted(await read_topic(kafka, other, until=3)) == sorted(ids[1:])


async def test_replay_skips_requests_whose_earlier_replay_was_answered_with_an_error(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    """An error is a result too, as in Redis: replaying again would answer twice."""
    run = uuid.uuid4().hex[:8]
    dead_letters, replies = f"test.dlq.{run}", f"test.replies.{run}"
    settings = make_settings(kafka, model_root, None, SURGE_WORKER__DEAD_LETTER_TOPIC=dead_letters)
    topic = settings.worker.topic_prefix + "mlp"
    await create_topics(kafka, topic, dead_letters, replies)
    await run_worker(settings)
    request_id = f"{run}-0"
    wrong = request_body({"x": np.ones((1, 31), np.float32)}, request_id, MSGPACK)  # 31 wide
    lost = request_headers(model="mlp", content_type=MSGPACK, reply_to=None)
    await publish(kafka, [(topic, request_id.encode(), wrong, lost)])
    await read_topic(kafka, dead_letters, until=1, key_of=None)

    common = ("--topic", dead_letters, "--bootstrap", kafka, "--reply-to", replies)
    first = surge("dlq", "replay", *common)
    assert "replayed 1" in first.stdout, first.stdout + first.stderr
    (answer,) = (await read_topic(kafka, replies, until=1))[request_id]
    assert answer.headers[headers.STATUS] == b"error"
    again = surge("dlq", "replay", *common)
    assert "replayed 0" in again.stdout, again.stdout + again.stderr
    assert "1 already answered" in again.stdout
    results = await read_topic(kafka, replies, until=2, timeout=3)
    assert len(results[request_id]) == 1


async def test_inspect_reads_headers_without_holding_the_bodies(kafka: str) -> None:
    small, large = f"test.dlq.{uuid.uuid4().hex[:8]}", f"test.dlq.{uuid.uuid4().hex[:8]}"
    await create_topics(kafka, small, large, partitions=1)
    letter = [(headers.ERROR_CODE, b"reply_failed"), (headers.SOURCE_TOPIC, b"surge.requests.mlp")]
    body = np.random.default_rng(0).bytes(900_000)
    await publish(kafka, [(small, b"k", b"x", letter)])
    await publish(kafka, [(large, f"k{i}".encode(), body, letter) for i in range(60)])
    peaks = {}
    for topic in (small, large):
        inspect = ("dlq", "inspect", "--topic", topic, "--bootstrap", kafka)
        peaks[topic] = await asyncio.to_thread(_peak_rss_kb, *inspect)
    # 54 MB of bodies: held, they would show; read and dropped, they stay within a fetch.
    assert peaks[large] - peaks[small] < 25_000, peaks


def _peak_rss_kb(*args: str) -> int:
    """The peak resident memory of one `surge` run, in KiB."""
    script = (
        "import resource, subprocess, sys; "
        "command = [sys.executable, '-m', 'surge', *sys.argv[1:]]; "
        "done = subprocess.run(command, capture_output=True); "
        "assert done.returncode == 0, done.stderr; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


async def test_replay_skips_letters_with_nowhere_to_reply_unless_given_one(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    """Without a reply target there is no result to find: every replay would run it again."""
    run, dead_letters = await _dead_letter_lost_requests(kafka, model_root, run_worker, 5)
    common = ("--topic", dead_letters, "--bootstrap", kafka)
    out = surge("dlq", "replay", *common)
    assert out.returncode == 1, out.stderr  # selected, and none of them could be replayed
    assert "replayed 0" in out.stdout, out.stdout + out.stderr
    assert "5 without a reply target" in out.stdout
    assert "pass --reply-to" in out.stdout
    given = surge("dlq", "replay", *common, "--reply-to", f"test.replies.{run}", "--dry-run")
    assert "would replay 5" in given.stdout, given.stdout + given.stderr
    assert given.returncode == 0, given.stderr


async def test_replay_until_the_last_time_inspect_shows_takes_every_letter(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    run, dead_letters = await _dead_letter_lost_requests(kafka, model_root, run_worker, 5)
    common = ("--topic", dead_letters, "--bootstrap", kafka)
    inspect = surge("dlq", "inspect", *common)
    assert inspect.returncode == 0, inspect.stderr
    _first, last = re.findall(r"\d{4}-\d\d-\d\dT\S+\+00:00", inspect.stdout)
    until = ("--until", last, "--reply-to", f"test.replies.{run}", "--dry-run")
    dry = surge("dlq", "replay", *common, *until)
    assert "selected 5: would replay 5" in dry.stdout, inspect.stdout + dry.stdout + dry.stderr
    # Without an offset the time is UTC, as inspect shows it, whatever the local zone.
    naive = ("--until", last.removesuffix("+00:00"), *until[2:])
    tokyo = surge("dlq", "replay", *common, *naive, env={"TZ": "JST-9"})
    assert "selected 5: would replay 5" in tokyo.stdout, tokyo.stdout + tokyo.stderr


@pytest.mark.parametrize("action", ["inspect", "replay"])
def test_dlq_explains_an_unreachable_broker(action: str) -> None:
    out = surge("dlq", action, "--topic", "x", "--bootstrap", f"127.0.0.1:{free_port()}")
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.startswith("Kafka at 127.0.0.1:")
    assert len(out.stderr.splitlines()) == 1, out.stderr  # no traceback, no "Unclosed ..."


async def test_replay_explains_an_unreachable_redis_without_its_password(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    _, dead_letters = await _dead_letter_lost_requests(kafka, model_root, run_worker, 1)
    redis_url = f"redis://:hunter2@127.0.0.1:{free_port()}"
    args = ("--topic", dead_letters, "--bootstrap", kafka, "--reply-to", "redis")
    out = surge("dlq", "replay", *args, "--redis-url", redis_url)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.startswith("Redis: ")
    assert len(out.stderr.splitlines()) == 1, out.stderr
    assert "hunter2" not in out.stderr


async def test_inspect_refuses_a_topic_that_does_not_exist_and_does_not_create_it(
    kafka: str,
) -> None:
    missing = f"test.dlq.typo.{uuid.uuid4().hex[:8]}"
    out = surge("dlq", "inspect", "--topic", missing, "--bootstrap", kafka)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"topic '{missing}' does not exist" in out.stderr
    assert len(out.stderr.splitlines()) == 1, out.stderr
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        assert missing not in await admin.list_topics()
    finally:
        await admin.close()


async def test_reading_gives_up_when_a_partition_stops_short_of_its_end(kafka: str) -> None:
    topic = f"test.dlq.{uuid.uuid4().hex[:8]}"
    await create_topics(kafka, topic, partitions=1)
    record = request_headers(model="mlp", content_type=MSGPACK, reply_to="r")
    await publish(kafka, [(topic, b"k", b"body", record)] * 3)
    headers_only = await read_all(kafka, topic, values=False)
    assert [(dict(r.headers)["surge-model"], r.value) for r in headers_only] == [(b"mlp", b"")] * 3

    consumer = AIOKafkaConsumer(bootstrap_servers=kafka, enable_auto_commit=False)
    await consumer.start()
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        consumer.seek(partition, 0)
        # An end the partition never reaches, as when its leader is gone mid-read.
        reading = read_to_end(consumer, {partition: 10}, stall_s=1.0)
        with pytest.raises(TopicUnreadable, match=rf"before the end of {topic}\[0\]"):
            await asyncio.wait_for(reading, 30)
    finally:
        await consumer.stop()


@pytest.mark.parametrize("given", ["options", "settings"])
async def test_replay_looks_for_redis_results_under_the_workers_key_prefix(
    kafka: str,
    redis_url: str,
    model_root: Path,
    run_worker: Callable[[Settings], Worker],
    tmp_path: Path,
    given: str,
) -> None:
    """Where the workers' Redis and key prefix are: given as options, or read from their
    settings file."""
    run, dead_letters = await _dead_letter_lost_requests(kafka, model_root, run_worker, 2)
    prefix = f"app.{run}:"
    redis = Redis.from_url(redis_url)
    try:
        await redis.set(f"{prefix}{run}-0", b"answered")  # by a worker with that key_prefix
    finally:
        await redis.aclose()
    where = ("--redis-url", redis_url, "--redis-prefix", prefix)
    if given == "settings":
        config = tmp_path / "worker.toml"
        config.write_text(f'[redis]\nurl = "{redis_url}"\nkey_prefix = "{prefix}"\n')
        where = ("-c", str(config))
    out = surge(
        "dlq",
        "replay",
        *("--topic", dead_letters, "--bootstrap", kafka, "--reply-to", "redis"),
        *where,
        "--dry-run",
    )
    assert "would replay 1" in out.stdout, out.stdout + out.stderr
    assert "1 already answered" in out.stdout


def _letters(
    run: str, source: str, count: int, reply_to: str, body_size: int = 0
) -> list[tuple[str, bytes, bytes, list[tuple[str, bytes]]]]:
    """Dead letters as a worker writes them: (topic, key, value, headers), minus the topic."""
    x = {"x": np.ones((1, 32), np.float32)}
    letters = []
    for i in range(count):
        request_id = f"{run}-{i}"
        value = request_body(x, request_id, MSGPACK) + b" " * body_size
        route = request_headers(model="mlp", content_type=MSGPACK, reply_to=reply_to)
        evidence = [
            (headers.ERROR_CODE, b"invalid_reply_to"),
            (headers.ERROR_MESSAGE, b"no reply target"),
            (headers.SOURCE_TOPIC, source.encode()),
            (headers.SOURCE_PARTITION, b"0"),
            (headers.SOURCE_OFFSET, str(i).encode()),
        ]
        letters.append((request_id.encode(), value, [*route, *evidence]))
    return letters


async def test_a_second_replay_before_any_answer_sends_nothing_twice(kafka: str) -> None:
    """No worker answers: a result cannot tell what was replayed, the replay's marker does.
    One request was dead-lettered twice (redelivered after its first letter): the second
    replay sends neither of its letters, though the marker is on one of them only."""
    run = uuid.uuid4().hex[:8]
    dead_letters, source, replies = f"test.dlq.{run}", f"test.src.{run}", f"test.replies.{run}"
    await create_topics(kafka, dead_letters, source, replies)
    letters = _letters(run, source, 3, replies)
    letters.append(letters[0])
    await publish(kafka, [(dead_letters, k, v, h) for k, v, h in letters])

    common = ("--topic", dead_letters, "--bootstrap", kafka)
    first = surge("dlq", "replay", *common)
    assert "replayed 3" in first.stdout, first.stdout + first.stderr
    assert "1 repeated" in first.stdout
    again = surge("dlq", "replay", *common)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "replayed 0" in again.stdout, again.stdout
    assert "4 replayed before" in again.stdout
    replayed = await read_results(kafka, source, key_of=None)
    assert {k: len(v) for k, v in replayed.items()} == {f"{run}-{i}": 1 for i in range(3)}
    inspect = surge("dlq", "inspect", *common)
    assert re.search(r"invalid_reply_to\s*│\s*4\s*│\s*3\s*│", inspect.stdout), inspect.stdout


async def test_a_replayed_request_that_fails_again_can_be_replayed_again(kafka: str) -> None:
    """Its new letter (the replay's, `surge-replays: 1`) is newer than the replay: a fixed
    cause lets it run again, while the letters the replay answered stay skipped."""
    run = uuid.uuid4().hex[:8]
    dead_letters, source, replies = f"test.dlq.{run}", f"test.src.{run}", f"test.replies.{run}"
    await create_topics(kafka, dead_letters, source, replies)
    letters = _letters(run, source, 2, replies)
    await publish(kafka, [(dead_letters, k, v, h) for k, v, h in letters])
    common = ("--topic", dead_letters, "--bootstrap", kafka)
    assert "replayed 2" in surge("dlq", "replay", *common).stdout

    # A worker dead-letters the replayed request of `{run}-0` again: its headers, the
    # replay's count among them, and the evidence.
    replayed = (await read_results(kafka, source, key_of=None))[f"{run}-0"]
    (again,) = replayed
    assert again.headers[headers.REPLAYS] == b"1"
    evidence = [
        (headers.ERROR_CODE, b"invalid_reply_to"),
        (headers.SOURCE_TOPIC, source.encode()),
        (headers.SOURCE_PARTITION, b"0"),
        (headers.SOURCE_OFFSET, b"7"),
    ]
    letter = (dead_letters, again.key, again.value, [*again.headers.items(), *evidence])
    await publish(kafka, [letter])

    out = surge("dlq", "replay", *common)
    assert "replayed 1" in out.stdout, out.stdout + out.stderr
    assert "2 replayed before" in out.stdout
    replayed = await read_results(kafka, source, key_of=None)
    assert {k: len(v) for k, v in replayed.items()} == {f"{run}-0": 2, f"{run}-1": 1}
    third = [r for r in replayed[f"{run}-0"] if r.headers[headers.REPLAYS] == b"2"]
    assert len(third) == 1


async def test_of_two_unmarked_letters_of_a_request_the_most_replayed_is_sent_once(
    kafka: str,
) -> None:
    """A replay whose marker was lost, and whose request failed again: its letter (replays 0)
    and the new one (replays 1) are both unmarked. One replay sends the newer, and a second
    replay sends neither."""
    run = uuid.uuid4().hex[:8]
    dead_letters, source, replies = f"test.dlq.{run}", f"test.src.{run}", f"test.replies.{run}"
    await create_topics(kafka, dead_letters, source, replies)
    ((key, value, first),) = _letters(run, source, 1, replies)
    newer = [*first, (headers.REPLAYS, b"1")]
    await publish(kafka, [(dead_letters, key, value, first), (dead_letters, key, value, newer)])
    common = ("--topic", dead_letters, "--bootstrap", kafka)
    once = surge("dlq", "replay", *common)
    assert "replayed 1" in once.stdout, once.stdout + once.stderr
    again = surge("dlq", "replay", *common)
    assert "replayed 0" in again.stdout, again.stdout + again.stderr
    (sent,) = (await read_results(kafka, source, key_of=None))[f"{run}-0"]
    assert sent.headers[headers.REPLAYS] == b"2"


def test_a_letter_is_named_as_the_worker_named_its_request() -> None:
    """Without an id in the body: by its key where that could be an id, else by its source
    position, as the worker names it (and its result); a replay count not in ASCII digits
    counts as none."""
    position = [(headers.SOURCE_TOPIC, b"t"), (headers.SOURCE_PARTITION, b"0")]
    position.append((headers.SOURCE_OFFSET, b"5"))
    for key, request_id in [(b"r-1", "r-1"), (b"k" * 300, "t-0-5"), (None, "t-0-5")]:
        letter = DeadLetter(key, b"{}", position, 0, 0, 0)
        assert letter.request_id == request_id
    assert DeadLetter(None, b"", [(headers.REPLAYS, "²".encode())], 0, 0, 0).replays == 0


async def test_a_replay_stopped_part_way_marks_every_letter_it_sent(kafka: str) -> None:
    """Ctrl-C part way: the producer still sends what it holds as it stops, so each of those
    gets its marker too, and a rerun sends the others only."""
    run = uuid.uuid4().hex[:8]
    dead_letters, source, replies = f"test.dlq.{run}", f"test.src.{run}", f"test.replies.{run}"
    await create_topics(kafka, dead_letters, source, replies, partitions=1)
    count = 5000
    letters = _letters(run, source, count, replies)
    await publish(kafka, [(dead_letters, k, v, h) for k, v, h in letters])
    chosen = await dlq.load(kafka, dead_letters)
    replay = asyncio.create_task(dlq.replay(kafka, dead_letters, chosen))
    watcher = AIOKafkaConsumer(bootstrap_servers=kafka)
    await watcher.start()
    try:
        tp = TopicPartition(source, 0)
        async with asyncio.timeout(60):
            while not (await watcher.end_offsets([tp]))[tp]:  # the first replayed is in
                await asyncio.sleep(0.005)
    finally:
        await watcher.stop()
    replay.cancel()
    with pytest.raises(asyncio.CancelledError):
        await replay  # stopped part way, not finished first
    sent = await read_results(kafka, source, key_of=None)
    marked = [r for r in await read_all(kafka, dead_letters) if headers.REPLAYED in dict(r.headers)]
    assert sent
    assert len(marked) == len(sent)
    rerun = surge("dlq", "replay", "--topic", dead_letters, "--bootstrap", kafka)
    assert f"replayed {count - len(sent):,}" in rerun.stdout, rerun.stdout + rerun.stderr
    replayed = await read_results(kafka, source, key_of=None)
    assert {k: len(v) for k, v in replayed.items()} == {f"{run}-{i}": 1 for i in range(count)}


async def test_replay_skips_letters_whose_reply_topic_is_gone_unless_given_one(
    kafka: str,
) -> None:
    """A client's own reply topic goes when it closes: replayed, its requests would be
    computed for nobody and come back as new dead letters, at every replay."""
    run = uuid.uuid4().hex[:8]
    dead_letters, source = f"test.dlq.{run}", f"test.src.{run}"
    await create_topics(kafka, dead_letters, source)
    letters = _letters(run, source, 3, f"surge.replies.{run}")  # never created
    await publish(kafka, [(dead_letters, k, v, h) for k, v, h in letters])
    common = ("--topic", dead_letters, "--bootstrap", kafka)
    out = surge("dlq", "replay", *common)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "replayed 0" in out.stdout, out.stdout
    assert "3 whose reply topic is gone" in out.stdout
    assert "pass --reply-to" in out.stdout
    given = surge("dlq", "replay", *common, "--reply-to", f"test.replies.{run}", "--dry-run")
    assert "would replay 3" in given.stdout, given.stdout + given.stderr


async def test_replay_looks_through_a_busy_reply_topic_holding_only_its_own_results(
    kafka: str,
) -> None:
    """A shared reply topic holds everyone's results: the scan for answered requests keeps
    those of the letters' requests and drops the rest as it reads."""
    run = uuid.uuid4().hex[:8]
    source = f"test.src.{run}"
    await create_topics(kafka, source)
    peaks, outs = {}, {}
    for busy in (False, True):
        dead_letters, replies = f"test.dlq.{run}.{busy}", f"test.replies.{run}.{busy}"
        await create_topics(kafka, dead_letters, replies, partitions=1)
        letters = _letters(f"{run}-{busy}", source, 3, replies)
        await publish(kafka, [(dead_letters, k, v, h) for k, v, h in letters])
        # Others' results with 10 kB of headers each: 60 MB, were they all held.
        trace = ("trace", b"x" * 10_000)
        others = [[(headers.REQUEST_ID, f"other-{i}".encode()), trace] for i in range(6_000)]
        ours = [(headers.REQUEST_ID, f"{run}-{busy}-0".encode())]
        await publish(kafka, [(replies, None, b"", h) for h in [*others[: 6_000 * busy], ours]])
        replay = ("dlq", "replay", "--topic", dead_letters, "--bootstrap", kafka, "--dry-run")
        peaks[busy] = await asyncio.to_thread(_peak_rss_kb, *replay)
        outs[busy] = surge(*replay).stdout
    assert peaks[True] - peaks[False] < 25_000, peaks
    for out in outs.values():
        assert "would replay 2, skipped 1 already answered" in out, out


async def test_a_letter_kafka_refuses_is_reported_and_the_others_are_replayed(
    kafka: str,
) -> None:
    run = uuid.uuid4().hex[:8]
    dead_letters, source, replies = f"test.dlq.{run}", f"test.src.{run}", f"test.replies.{run}"
    await create_topics(kafka, dead_letters, replies)
    await create_topics(kafka, source, configs={"max.message.bytes": "20000"})
    small, large = _letters(run, source, 3, replies), _letters(f"{run}x", source, 1, replies)
    large = [(k, v + b" " * 50_000, h) for k, v, h in large]
    await publish(kafka, [(dead_letters, k, v, h) for k, v, h in small[:1] + large + small[1:]])

    out = surge("dlq", "replay", "--topic", dead_letters, "--bootstrap", kafka)
    assert out.returncode == 1, out.stdout + out.stderr  # one could not be replayed
    assert "replayed 3" in out.stdout, out.stdout
    assert "1 refused by Kafka" in out.stdout
    assert "MessageSizeTooLargeError" in out.stdout
    replayed = await read_results(kafka, source, key_of=None)
    assert sorted(replayed) == sorted(f"{run}-{i}" for i in range(3))


async def _inspect_one(kafka: str, letter_headers: list[tuple[str, bytes]]) -> str:
    """`surge dlq inspect` of a topic holding one letter with these headers: its output."""
    dead_letters = f"test.dlq.{uuid.uuid4().hex[:8]}"
    await create_topics(kafka, dead_letters, partitions=1)
    await publish(kafka, [(dead_letters, b"k", b"x", letter_headers)])
    out = surge("dlq", "inspect", "--topic", dead_letters, "--bootstrap", kafka)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize(
    ("letter_headers", "expected"),
    [
        pytest.param(
            [
                (headers.ERROR_CODE, b"invalid_reply_to"),
                (headers.ERROR_MESSAGE, b"reply topic 'replies[/]' is not allowed"),
                (headers.SOURCE_TOPIC, b"surge.requests.[red]mlp"),
            ],
            ["'replies[/]' is not allowed", "surge.requests.[red]mlp"],
            # A worker's message repeats a client's header: `[/]` in it is no closing tag.
            id="text-not-markup",
        ),
        pytest.param(
            [
                (headers.ERROR_CODE, b"reply_failed"),
                (headers.ERROR_MESSAGE, b"the cause"),
                (headers.ERROR_MESSAGE, b"original value of 9 bytes dropped"),
            ],
            ["the cause; original value of 9 bytes dropped"],
            id="the-cause-before-what-was-dropped-to-fit",
        ),
    ],
)
async def test_inspect_shows_what_a_letter_says_as_it_says_it(
    kafka: str, letter_headers: list[tuple[str, bytes]], expected: list[str]
) -> None:
    shown = await _inspect_one(kafka, letter_headers)
    for text in expected:
        assert text in shown, shown
