"""Bad input never crashes the worker nor stalls its partition: each gets a clear error result,
or a dead letter carrying the original bytes when there is nowhere to reply."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
import pytest

from surge.config import Settings
from surge.producers import SurgeClient, read_result
from surge.producers.requests import Prediction, PredictionError
from surge.schemas import JSON, MSGPACK, ErrorCode, headers
from surge.workers import Worker
from tests.conftest import make_settings
from tests.helpers import create_topics, publish, read_topic, wait_committed
from tests.models import write_echo_text, write_picky

pytestmark = pytest.mark.integration


def _json(request_id: str, x: object, *, datatype: str = "FP32", name: str = "x") -> bytes:
    shape = list(np.shape(x))
    tensor = {"name": name, "shape": shape, "datatype": datatype, "data": np.ravel(x).tolist()}
    return json.dumps({"id": request_id, "inputs": [tensor]}).encode()


def _route(reply_to: str | None, content_type: str = JSON, **extra: str) -> list[tuple[str, bytes]]:
    fields = {headers.CONTENT_TYPE: content_type, **extra}
    if reply_to:
        fields[headers.REPLY_TO] = reply_to
    return [(k, v.encode()) for k, v in fields.items()]


@dataclass
class Served:
    worker: Worker
    dead_letters: str
    mlp: str  # request topics
    picky: str


@pytest.fixture
async def served(
    kafka: str, redis_url: str, model_root: Path, run_worker: Callable[[Settings], Worker]
) -> Served:
    write_picky(model_root)
    settings = make_settings(
        kafka,
        model_root,
        redis_url,
        SURGE_WORKER__MAX_MESSAGE_BYTES="65536",
        SURGE_WORKER__MAX_TENSOR_ELEMENTS="4096",
        SURGE_WORKER__DEAD_LETTER_TOPIC=f"test.dlq.{uuid.uuid4().hex[:6]}",
    )
    prefix = settings.worker.topic_prefix
    result = Served(
        worker=None,  # type: ignore[arg-type]
        dead_letters=settings.worker.dead_letter_topic,
        mlp=prefix + "mlp",
        picky=prefix + "picky",
    )
    await create_topics(kafka, result.mlp, result.picky, result.dead_letters)
    result.worker = await run_worker(settings)
    return result


async def test_every_bad_input_gets_a_clear_error(kafka: str, served: Served) -> None:
    run = uuid.uuid4().hex[:8]
    replies = f"test.replies.{run}"
    await create_topics(kafka, replies)
    good = np.ones((1, 32), np.float32)
    past = str(int(time.time() * 1000) - 1000)
    # (id, value, headers, expected code); the id is also the Kafka key.
    cases: list[tuple[str, bytes, list[tuple[str, bytes]], ErrorCode | None]] = [
        ("garbage-json", b"\x00\xffnot json", _route(replies), ErrorCode.BAD_ENCODING),
        ("garbage-msgpack", b"\xc1\xc1", _route(replies, MSGPACK), ErrorCode.BAD_ENCODING),
        ("schema", b'{"inputs": 5}', _route(replies), ErrorCode.INVALID_REQUEST),
        ("no-inputs-field", b'{"id": "x"}', _route(replies), ErrorCode.INVALID_REQUEST),
        (
            "model",
            _json("model", good),
            _route(replies, **{headers.MODEL: "nope"}),
            ErrorCode.UNKNOWN_MODEL,
        ),
        (
            "version",
            _json("version", good),
            _route(replies, **{headers.VERSION: "99"}),
            ErrorCode.UNKNOWN_VERSION,
        ),
        (
            "datatype",
            _json("datatype", good, datatype="FP64"),
            _route(replies),
            ErrorCode.INVALID_INPUT,
        ),
        ("shape", _json("shape", np.ones((1, 31))), _route(replies), ErrorCode.INVALID_INPUT),
        ("name", _json("name", good, name="y"), _route(replies), ErrorCode.INVALID_INPUT),
        (
            "values",
            b'{"inputs": [{"name": "x", "shape": [1, 32], "datatype": "FP32", "data": ["a"]}]}',
            _route(replies),
            ErrorCode.INVALID_INPUT,
        ),
        ("oversized", b" " * 70_000, _route(replies), ErrorCode.TOO_LARGE),
        ("elements", _json("elements", np.ones((200, 32))), _route(replies), ErrorCode.TOO_LARGE),
        ("content-type", b"1,2,3", _route(replies, "text/csv"), ErrorCode.UNSUPPORTED_CONTENT_TYPE),
        (
            "deadline",
            _json("deadline", good),
            _route(replies, **{headers.DEADLINE_MS: past}),
            ErrorCode.EXPIRED,
        ),
        (
            "deadline-junk",
            _json("deadline-junk", good),
            _route(replies, **{headers.DEADLINE_MS: "soon"}),
            ErrorCode.INVALID_REQUEST,
        ),
    ]
    valid = [(f"ok-{i}", _json(f"ok-{i}", good * i), _route(replies), None) for i in range(50)]
    interleaved = [c for pair in zip(cases, valid, strict=False) for c in pair] + valid[
        len(cases) :
    ]
    await publish(kafka, [(served.mlp, i.encode(), v, h) for i, v, h, _ in interleaved])

    results = await read_topic(kafka, replies, until=len(interleaved), timeout=60)
    for request_id, _, _, code in interleaved:
        (reply,) = results[request_id]
        assert reply.key == request_id.encode()
        content_type = reply.headers[headers.CONTENT_TYPE].decode()
        result = read_result(reply.value, content_type, reply.headers[headers.STATUS].decode())
        if code is None:
            assert isinstance(result, Prediction)
            continue
        assert isinstance(result, PredictionError), request_id
        assert result.code == code, (request_id, result)
        assert result.message
        expected_status = "expired" if code is ErrorCode.EXPIRED else "error"
        assert reply.headers[headers.STATUS] == expected_status.encode()
        assert reply.headers[headers.ERROR_CODE] == code.encode()
    await _assert_fully_committed(kafka, served.worker, served.mlp)


async def test_no_reply_target_goes_to_dead_letters(kafka: str, served: Served) -> None:
    original = _json("lost", np.ones((1, 32), np.float32))
    cases = {
        "no-reply-to": _route(None),
        "reply-to-request-topic": _route(served.mlp),
        "reply-to-bad-name": _route("not a topic!"),
    }
    await publish(kafka, [(served.mlp, key.encode(), original, h) for key, h in cases.items()])
    letters = await read_topic(kafka, served.dead_letters, until=len(cases), key_of=None)
    by_key = {reply.key.decode(): reply for replies in letters.values() for reply in replies}
    assert set(by_key) == set(cases)
    for key, sent_headers in cases.items():
        letter = by_key[key]
        assert letter.value == original  # the original bytes, untouched
        for name, value in sent_headers:
            assert letter.headers[name] == value  # and the original headers
        assert letter.headers[headers.ERROR_CODE] == ErrorCode.INVALID_REPLY_TO.encode()
        assert letter.headers[headers.SOURCE_TOPIC] == served.mlp.encode()
        assert int(letter.headers[headers.SOURCE_OFFSET]) >= 0
        assert letter.headers[headers.ERROR_MESSAGE]
    await _assert_fully_committed(kafka, served.worker, served.mlp)


async def test_a_failing_request_is_isolated_from_its_batch(kafka: str, served: Served) -> None:
    replies = f"test.replies.{uuid.uuid4().hex[:8]}"
    await create_topics(kafka, replies)
    values = [np.full((1, 4), i, np.float32) for i in range(20)]
    values[7] = -values[7] - 1  # this one makes the model raise
    records = [
        (
            served.picky,
            f"p{i}".encode(),
            msgspec.msgpack.encode(
                {
                    "id": f"p{i}",
                    "inputs": [
                        {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": v.tobytes()}
                    ],
                }
            ),
            _route(replies, MSGPACK),
        )
        for i, v in enumerate(values)
    ]
    await publish(kafka, records)  # inside one 30 ms batch window
    results = await read_topic(kafka, replies, until=len(values))
    for i, v in enumerate(values):
        (reply,) = results[f"p{i}"]
        result = read_result(reply.value, MSGPACK, reply.headers[headers.STATUS].decode())
        if i == 7:
            assert isinstance(result, PredictionError)
            assert result.code == ErrorCode.MODEL_ERROR
            assert "negative input" in result.message
        else:
            assert isinstance(result, Prediction)
            np.testing.assert_array_equal(result.outputs["y"], v * 2)


async def _assert_fully_committed(kafka: str, worker: Worker, topic: str) -> None:
    """Every record of the topic has a durable outcome and its offset is committed."""
    await wait_committed(kafka, worker.settings.worker.group_id, topic, timeout=10)


async def test_a_dead_letter_too_large_for_its_topic_keeps_the_evidence_and_lands(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    """A request its topic takes, whose dead letter (it, plus why and where from) the
    dead-letter topic does not: first its value goes, then its own headers, then its key, and
    the letter lands rather than stop the worker and the partition for good."""
    settings = make_settings(
        kafka,
        model_root,
        None,
        SURGE_WORKER__REPLY_RETRY_S="0.5",
        SURGE_WORKER__DEAD_LETTER_TOPIC=f"test.dlq.{uuid.uuid4().hex[:6]}",
    )
    topic, dead_letters = settings.worker.topic_prefix + "mlp", settings.worker.dead_letter_topic
    await create_topics(kafka, topic, partitions=1, configs={"max.message.bytes": "100000"})
    await create_topics(kafka, dead_letters, partitions=1, configs={"max.message.bytes": "40000"})
    worker = await run_worker(settings)
    original = _json("big", np.ones((1, 32), np.float32))
    cases = {  # no reply target: each one's outcome is a dead letter
        "big-value": (original + b" " * 39_600, _route(None)),
        "big-headers": (b"{}", [*_route(None), ("x-trace", b"t" * 39_750)]),
    }
    records = [(topic, key.encode(), body, h) for key, (body, h) in cases.items()]
    records.append((topic, b"k" * 60_000, b"{}", _route(None)))  # a key no id can be
    await publish(kafka, records)
    letters = await read_topic(kafka, dead_letters, until=len(records), key_of=None, timeout=30)
    by_key = {reply.key.decode(): reply for replies in letters.values() for reply in replies}
    big_key = by_key.pop(f"{topic}-0-2")  # its request's id: its position
    assert (
        big_key.headers[headers.ERROR_MESSAGE]
        == b"original key of 60000 bytes replaced by the request id"
    )
    assert set(by_key) == set(cases)
    assert by_key["big-value"].value == b""
    assert by_key["big-value"].headers[headers.ERROR_MESSAGE].startswith(b"original value of")
    assert by_key["big-value"].headers[headers.CONTENT_TYPE] == JSON.encode()  # its own, kept
    assert by_key["big-headers"].value == b""
    assert by_key["big-headers"].headers[headers.ERROR_MESSAGE].startswith(b"original headers of")
    assert "x-trace" not in by_key["big-headers"].headers
    for letter in [*by_key.values(), big_key]:
        assert letter.headers[headers.ERROR_CODE] == ErrorCode.INVALID_REPLY_TO.encode()
        assert letter.headers[headers.SOURCE_TOPIC] == topic.encode()
        assert letter.headers[headers.SOURCE_OFFSET] in (b"0", b"1", b"2")
    assert not worker.failed


async def test_a_string_input_reads_bytes_as_their_text_and_refuses_bytes_that_are_not(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    """msgpack carries BYTES values as bytes; a model's string input takes text."""
    write_echo_text(model_root)
    settings = make_settings(kafka, model_root, None)
    await run_worker(settings)
    topic = settings.worker.topic_prefix + "echo"
    texts = [b"hello", "h\u00e9llo", "h\u00e9llo".encode(), b"\xff\xfe"]
    batch = [{"text": np.array([[text]], dtype=object)} for text in texts]
    async with SurgeClient(kafka) as client:
        results = await client.predict_many(
            "echo", batch, timeout=30, topic=topic, return_exceptions=True
        )
    echoed = [r.outputs["echo"].tolist() for r in results[:3] if isinstance(r, Prediction)]
    assert echoed == [[["hello"]], [["h\u00e9llo"]], [["h\u00e9llo"]]], results
    refused = results[3]
    assert isinstance(refused, PredictionError), refused
    assert refused.code == ErrorCode.INVALID_INPUT
    assert "not UTF-8" in refused.message
