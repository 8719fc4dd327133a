"""Routing: requests queued before any worker exists are served when one starts, a shared
topic carries several models, and the unit rules of header routing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from surge.config import Settings
from surge.producers import SyncClient, read_result, request_body, request_headers
from surge.producers.requests import Prediction
from surge.schemas import JSON, MAX_ID_LENGTH, MSGPACK, ErrorCode, headers
from surge.workers import Router, Worker
from surge.workers.tickets import Rejection, Ticket
from tests.conftest import make_settings
from tests.helpers import create_topics, publish, read_topic
from tests.models import write_picky


class _Record:
    def __init__(self, topic: str, headers_: dict[str, str], key: bytes | None = b"k") -> None:
        self.topic, self.partition, self.offset = topic, 0, 7
        self.key, self.value = key, b"{}"
        self.headers = [(k, v.encode()) for k, v in headers_.items()]


def _ticket(record: _Record, redis: bool = True) -> tuple[Ticket, Rejection | None]:
    tp = TopicPartition(record.topic, record.partition)
    return _router(redis).ticket(record, tp, received=0.0)  # type: ignore[arg-type]


def _router(redis: bool = True) -> Router:
    return Router(
        {"surge.requests.mlp": "mlp", "shared": None},
        reply_topic_pattern=r"[a-z.]+",
        default_reply_to="",
        max_message_bytes=100,
        redis_enabled=redis,
        forbidden_reply_topics=["surge.requests.mlp", "shared", "dlq"],
    )


@pytest.mark.parametrize(
    ("topic", "fields", "code"),
    [
        ("surge.requests.mlp", {"surge-reply-to": "out"}, None),
        ("surge.requests.mlp", {"surge-reply-to": "redis"}, None),
        ("shared", {"surge-reply-to": "out", "surge-model": "mlp"}, None),
        ("shared", {"surge-reply-to": "out"}, ErrorCode.MISSING_ROUTE),
        ("surge.requests.mlp", {}, ErrorCode.INVALID_REPLY_TO),
        ("surge.requests.mlp", {"surge-reply-to": "dlq"}, ErrorCode.INVALID_REPLY_TO),
        ("surge.requests.mlp", {"surge-reply-to": "Bad!"}, ErrorCode.INVALID_REPLY_TO),
        (
            "surge.requests.mlp",
            {"surge-reply-to": "out", "content-type": "x/y"},
            ErrorCode.UNSUPPORTED_CONTENT_TYPE,
        ),
        (
            "surge.requests.mlp",
            {"surge-reply-to": "out", "surge-deadline-ms": "x"},
            ErrorCode.INVALID_REQUEST,
        ),
    ],
)
def test_header_routing(topic: str, fields: dict[str, str], code: ErrorCode | None) -> None:
    ticket, rejection = _ticket(_Record(topic, fields))
    assert (rejection.code if rejection else None) == code
    assert ticket.request_id == "k"
    assert ticket.content_type in (JSON, MSGPACK)


def test_redis_replies_need_redis() -> None:
    _, rejection = _ticket(_Record("shared", {"surge-reply-to": "redis"}), redis=False)
    assert rejection is not None
    assert rejection.code is ErrorCode.INVALID_REPLY_TO


def test_null_header_values_count_as_absent() -> None:
    record = _Record("surge.requests.mlp", {"surge-reply-to": "out"})
    record.headers.append(("surge-version", None))  # type: ignore[arg-type]
    ticket, rejection = _ticket(record)
    assert rejection is None
    assert ticket.version is None


def test_an_unsupported_content_type_never_reaches_the_encoder() -> None:
    """Rejected for another reason first, the ticket still answers in a supported encoding."""
    record = _Record("surge.requests.mlp", {"surge-reply-to": "out", "content-type": "text/x"})
    record.headers.append(("surge-version", b"\xff\xfe"))
    ticket, rejection = _ticket(record)
    assert rejection is not None
    assert rejection.code is ErrorCode.INVALID_REQUEST
    assert ticket.content_type == JSON


def test_headers_routing_does_not_read_need_not_be_utf8() -> None:
    record = _Record("surge.requests.mlp", {"surge-reply-to": "out"})
    record.headers.append(("traceparent", b"\xff\xfe"))
    ticket, rejection = _ticket(record)
    assert rejection is None
    assert ticket.headers[-1] == ("traceparent", b"\xff\xfe")  # kept for the dead letter


@pytest.mark.parametrize(
    ("header", "code"),
    [
        ("surge-model", ErrorCode.INVALID_REQUEST),
        ("surge-version", ErrorCode.INVALID_REQUEST),
        ("content-type", ErrorCode.INVALID_REQUEST),
        ("surge-deadline-ms", ErrorCode.INVALID_REQUEST),
        ("surge-reply-to", ErrorCode.INVALID_REPLY_TO),
    ],
)
def test_a_routing_header_too_long_for_any_route_is_refused_and_never_kept(
    header: str, code: ErrorCode
) -> None:
    """Routes are kept by their headers' values: a megabyte-long model name must not be."""
    router = _router()
    record = _Record("shared", {"surge-reply-to": "out", "surge-model": "mlp"})
    record.headers = [(k, v) for k, v in record.headers if k != header]
    record.headers.append((header, b"1" * 1_000_000))
    ticket, rejection = router.ticket(record, TopicPartition("shared", 0), received=0.0)  # type: ignore[arg-type]
    assert rejection is not None
    assert rejection.code is code
    assert rejection.message == f"header {header!r} is over 255 bytes"
    assert all(len(raw or b"") <= 255 for _, routing in router._routes for _, raw in routing)
    assert all(len(value or "") <= 255 for value in (ticket.model, ticket.version, ticket.reply_to))


@pytest.mark.parametrize("model_first", [True, False])
@pytest.mark.parametrize("reply_to", [b"out\xff", b"o" * 300])
def test_an_unusable_reply_to_is_refused_as_a_reply_topic_whatever_else_is_wrong(
    reply_to: bytes, model_first: bool
) -> None:
    """A reply topic asked for but unreadable is not the default one: the error goes to the
    dead letters, however the header was unusable and whichever other header is too."""
    model = ("surge-model", b"m" * 300)
    record = _Record("shared", {})
    record.headers = [model, ("surge-reply-to", reply_to)]
    if not model_first:
        record.headers.reverse()
    router = Router(
        {"shared": None},
        reply_topic_pattern=r"[a-z.]+",
        default_reply_to="replies.default",
        max_message_bytes=100,
        redis_enabled=False,
        forbidden_reply_topics=[],
    )
    ticket, rejection = router.ticket(record, TopicPartition("shared", 0), received=0.0)  # type: ignore[arg-type]
    assert ticket.reply_to is None
    assert rejection is not None
    assert rejection.code is ErrorCode.INVALID_REPLY_TO
    assert "surge-reply-to" in rejection.message


@pytest.mark.parametrize("value", [b" 123 ", b"1_000", b"+5", "١٢٣".encode(), b"", b"1e3"])
def test_a_deadline_is_read_only_as_a_kafka_client_writes_a_long(value: bytes) -> None:
    record = _Record("surge.requests.mlp", {"surge-reply-to": "out"})
    record.headers.append(("surge-deadline-ms", value))
    _, rejection = _ticket(record)
    assert rejection is not None
    assert rejection.code is ErrorCode.INVALID_REQUEST
    assert "not an integer" in rejection.message


def test_a_deadline_of_digits_is_taken() -> None:
    record = _Record("surge.requests.mlp", {"surge-reply-to": "out"})
    record.headers.append(("surge-deadline-ms", b"1765000000123"))
    ticket, rejection = _ticket(record)
    assert rejection is None
    assert ticket.deadline_ms == 1765000000123


def test_a_repeated_routing_header_is_read_once_by_its_last_value() -> None:
    """A route is kept by its headers' values: thousands of repeats of one must not be."""
    router = _router()
    record = _Record("shared", {"surge-reply-to": "out", "surge-model": "mlp"})
    record.headers += [("surge-version", b"9" * 254)] * 4000 + [("surge-version", b"2")]
    ticket, rejection = router.ticket(record, TopicPartition("shared", 0), received=0.0)  # type: ignore[arg-type]
    assert rejection is None
    assert ticket.version == "2"
    ((_, routing),) = router._routes
    assert sorted(name for name, _ in routing) == ["surge-model", "surge-reply-to", "surge-version"]


@pytest.mark.parametrize("others", [0, 3])
@pytest.mark.parametrize(
    "values",
    [[b"\xff", b"out"], [b"o" * 300, b"out"], [b"out", b"\xff"], [b"out", b"o" * 300]],
)
def test_the_last_value_of_a_repeated_header_decides_however_many_others_come_with_it(
    values: list[bytes], others: int
) -> None:
    """A record that repeats a header is routed as one carrying its last value alone: an
    unusable value followed by a usable one is replaced by it, and the other way round,
    whether the record repeats other routing headers or not."""

    def routed(reply_to: list[bytes]) -> tuple[str | None, Rejection | None]:
        record = _Record("surge.requests.mlp", {})
        record.headers = [("surge-reply-to", value) for value in reply_to]
        record.headers += [("surge-model", b"mlp")] * others
        ticket, rejection = _ticket(record, redis=False)
        return ticket.reply_to, rejection

    assert routed(values) == routed(values[-1:])
    if values[-1] == b"out":
        assert routed(values) == ("out", None)


def test_a_ticket_holds_the_size_of_its_value_key_and_headers() -> None:
    record = _Record("surge.requests.mlp", {"surge-reply-to": "out"})
    record.headers.append(("trace", b"t" * 1000))
    ticket, _ = _ticket(record)
    assert ticket.size == 2 + 1 + len("surge-reply-to") + 3 + len("trace") + 1000


def test_ids_fall_back_to_the_record_position() -> None:
    ticket, _ = _ticket(_Record("shared", {}, key=None))
    assert ticket.request_id == "shared-0-7"


@pytest.mark.parametrize(
    ("key", "request_id"),
    [
        (b"r-1", "r-1"),
        (("é" * MAX_ID_LENGTH).encode(), "é" * MAX_ID_LENGTH),
        (("é" * (MAX_ID_LENGTH + 1)).encode(), "shared-0-7"),  # longer than a body's id may be
        (b"x" * 10_000, "shared-0-7"),
        (b"\xff\xfe", "shared-0-7"),  # not UTF-8
    ],
)
def test_a_key_is_the_id_only_where_it_could_be_a_bodys(key: bytes, request_id: str) -> None:
    ticket, _ = _ticket(_Record("shared", {}, key=key))
    assert ticket.request_id == request_id


def test_consecutive_records_are_decided_by_their_own_headers() -> None:
    """Headers equal to the previous record's reuse its decision; any difference, or another
    topic, is decided anew."""
    router = _router()

    def ticket(topic: str, fields: dict[str, str]) -> tuple[Ticket, ErrorCode | None]:
        record = _Record(topic, fields)
        record.headers = tuple(record.headers)  # type: ignore[assignment]  # as aiokafka's
        tp = TopicPartition(topic, 0)
        made, rejection = router.ticket(record, tp, received=0.0)  # type: ignore[arg-type]
        return made, rejection.code if rejection else None

    fields = {"surge-reply-to": "out", "surge-deadline-ms": "5"}
    assert ticket("surge.requests.mlp", fields)[0].deadline_ms == 5
    assert ticket("surge.requests.mlp", fields)[0].deadline_ms == 5
    assert ticket("surge.requests.mlp", {**fields, "surge-deadline-ms": "6"})[0].deadline_ms == 6
    late = {**fields, "surge-deadline-ms": "x"}
    assert ticket("surge.requests.mlp", late)[1] is ErrorCode.INVALID_REQUEST
    assert ticket("shared", late)[1] is ErrorCode.INVALID_REQUEST
    assert ticket("shared", fields)[1] is ErrorCode.MISSING_ROUTE
    shared, code = ticket("shared", {**fields, "surge-model": "mlp"})
    assert code is None
    assert shared.model == "mlp"


@pytest.mark.integration
async def test_queued_before_start_and_shared_topic(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    write_picky(model_root)
    run = uuid.uuid4().hex[:8]
    shared, replies = f"test.shared.{run}", f"test.replies.{run}"
    await create_topics(kafka, shared, replies)
    records = []
    for i in range(200):
        model, x = ("mlp", np.ones((1, 32), np.float32)) if i % 2 else ("picky", np.ones((1, 4)))
        body = request_body({"x": x.astype(np.float32)}, f"{run}-{i}", MSGPACK)
        route = request_headers(model=model, content_type=MSGPACK, reply_to=replies)
        records.append((shared, f"{run}-{i}".encode(), body, route))
    await publish(kafka, records)  # before any worker exists

    settings = make_settings(kafka, model_root, None, SURGE_WORKER__SHARED_TOPICS=f'["{shared}"]')
    await run_worker(settings)
    results = await read_topic(kafka, replies, until=200)
    assert len(results) == 200
    for i in range(200):
        (reply,) = results[f"{run}-{i}"]
        result = read_result(reply.value, MSGPACK, reply.headers[headers.STATUS].decode())
        assert isinstance(result, Prediction)
        assert result.model_name == ("mlp" if i % 2 else "picky")


@pytest.mark.integration
async def test_sync_client(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    worker = await run_worker(make_settings(kafka, model_root, None))
    prefix = worker.settings.worker.topic_prefix

    def blocking_caller() -> list[object]:
        with SyncClient(kafka, content_type=JSON, topic_prefix=prefix) as client:
            one = client.predict("mlp", {"x": np.zeros((2, 32), np.float32)}, timeout=30)
            many = client.predict_many(
                "mlp", [{"x": np.zeros((1, 31), np.float32)}], return_exceptions=True
            )
            return [one, *many]

    one, failed = await asyncio.to_thread(blocking_caller)
    assert isinstance(one, Prediction)
    assert one.outputs["probs"].shape == (2, 10)
    assert getattr(failed, "code", None) == ErrorCode.INVALID_INPUT


@pytest.mark.integration
@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
async def test_compressed_requests(
    codec: str, kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    worker = await run_worker(make_settings(kafka, model_root, None))
    topic = worker.settings.worker.topic_prefix + "mlp"
    replies = f"test.replies.{uuid.uuid4().hex[:8]}"
    await create_topics(kafka, topic, replies)
    producer = AIOKafkaProducer(bootstrap_servers=kafka, compression_type=codec)
    await producer.start()
    try:
        route = request_headers(model="mlp", content_type=MSGPACK, reply_to=replies)
        for i in range(5):
            body = request_body({"x": np.ones((1, 32), np.float32)}, f"{codec}-{i}", MSGPACK)
            await producer.send(topic, body, key=f"{codec}-{i}".encode(), headers=route)
        await producer.flush()
    finally:
        await producer.stop()
    results = await read_topic(kafka, replies, until=5)
    assert all(r.headers[headers.STATUS] == b"ok" for v in results.values() for r in v)
    assert len(results) == 5
