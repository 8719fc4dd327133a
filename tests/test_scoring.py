"""Scoring a file through real workers: one result line per input line, in input order, a bad
line answered in its place rather than stopping the run."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from subprocess import PIPE

import msgspec
import numpy as np
import pytest
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from surge.config import Settings
from surge.main import _answered_lines
from surge.producers import SurgeClient, request_body, request_headers
from surge.producers.scoring import (
    BadLine,
    ScoreReport,
    _write,
    chunks,
    file_lines,
    json_values,
    parse_line,
    request_limit,
    score_lines,
)
from surge.schemas import MSGPACK
from surge.workers import Worker
from tests.conftest import make_settings
from tests.helpers import (
    LARGE_LINE,
    SMALL_LINE,
    SMALL_TOPIC_CONFIGS,
    create_topics,
    read_topic,
    reference,
)
from tests.test_cli import surge

LIMIT = request_limit(SurgeClient(), "mlp")  # a client that never starts: its settings only
HUGE = json.dumps({"x": [[0.5] * 300_000]})  # 1.2 MB of float32: more than Kafka takes


@pytest.mark.parametrize(
    ("line", "dtype", "reason"),
    [
        pytest.param(b'{"x": [[1, 2]]}\xff', "float32", "not UTF-8", id="not-utf8"),
        pytest.param('{"x": [[300]]}', "int8", "not an array of int8", id="int8-overflow"),
        pytest.param('{"x": [[' + "9" * 400 + "]]}", "float32", "not an array", id="400-digits"),
        pytest.param('{"x": [[1e300]]}', "float32", "not an array of float32", id="1e300-f32"),
        pytest.param('{"x": ' + "[" * 100_000 + "]}", "float32", "not JSON", id="too-deep"),
        pytest.param('{"x": [[' + "1" * 5000 + "]]}", "float32", "not JSON", id="5000-digits"),
        pytest.param('{"x": [[1e400]]}', "float64", "not JSON", id="1e400-not-inf"),
        pytest.param('{"x": [[-1e400]]}', "float32", "not JSON", id="-1e400-not-inf"),
        pytest.param('{"x": [[NaN, Infinity]]}', "float32", "not JSON", id="nan-literal"),
        pytest.param('{"x": [[1]]}', "complex64", "cannot be encoded", id="no-wire-dtype"),
        pytest.param(HUGE, "float32", "more than Kafka takes", id="too-large"),
    ],
)
def test_a_line_that_cannot_be_sent_is_a_bad_line(
    line: str | bytes, dtype: str, reason: str
) -> None:
    parsed = parse_line(line, dtype, LIMIT)
    assert isinstance(parsed, BadLine)
    assert reason in parsed.reason


@pytest.mark.parametrize(
    ("line", "dtype", "reason"),
    [
        pytest.param('{"ids": [[1.7, 2]]}', "int64", "fractions", id="fraction-as-int64"),
        pytest.param('{"ids": [["12"]]}', "int32", "text", id="text-as-int32"),
        pytest.param('{"ids": [[true, false]]}', "int64", "true/false", id="bool-as-int64"),
        pytest.param('{"mask": [[0.5, 0]]}', "bool", "not BOOL", id="half-as-bool"),
        pytest.param('{"mask": [[2]]}', "bool", "not BOOL", id="two-as-bool"),
        pytest.param('{"x": [[true]]}', "float32", "true/false", id="bool-as-float"),
        pytest.param('{"s": [[1]]}', "str", "must be strings", id="number-as-str"),
    ],
)
def test_a_value_the_worker_would_refuse_is_a_bad_line_not_converted(
    line: str, dtype: str, reason: str
) -> None:
    parsed = parse_line(line, dtype, LIMIT)
    assert isinstance(parsed, BadLine), parsed
    assert reason in parsed.reason
    assert "not an array of" in parsed.reason


def test_values_of_the_datatype_s_kind_are_taken() -> None:
    ids = parse_line('{"ids": [[3.0, -4]]}', "int64", LIMIT)
    assert isinstance(ids, dict)
    assert ids["ids"].dtype == np.int64
    assert ids["ids"].tolist() == [[3, -4]]  # 3.0 is 3
    nan = parse_line('{"x": [[null, 1.5]]}', "float32", LIMIT)
    assert isinstance(nan, dict)
    assert np.isnan(nan["x"][0, 0])  # null stands for NaN in a float tensor


def test_a_request_at_the_limit_fits_what_the_producer_takes() -> None:
    client = SurgeClient()
    limit = request_limit(client, "mlp", ("12", None))
    record_headers = request_headers(
        model="mlp",
        content_type=MSGPACK,
        reply_to=client.reply_topic,
        version="12",
        deadline_ms=int(9e12),
    )
    body = request_body({"x": np.zeros((1, 8), np.float32)}, uuid.uuid4().hex, MSGPACK)
    largest = body + b"\0" * (limit.max_body - len(body))
    size = DefaultRecordBatchBuilder.estimate_size_in_bytes(
        uuid.uuid4().hex.encode(), largest, record_headers
    )
    assert size <= limit.max_request_size == 1_048_576  # how aiokafka checks it


def test_the_limit_is_the_clients_own_producers() -> None:
    """A client whose producer takes larger records scores larger lines."""
    roomy = SurgeClient(kafka_options={"max_request_size": 8 << 20})
    assert request_limit(roomy, "mlp").max_request_size == 8 << 20
    assert request_limit(roomy, "mlp", max_request_size=2 << 20).max_request_size == 2 << 20


def test_a_window_of_no_lines_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        next(chunks(["{}"], 0))


def test_file_lines_drop_a_byte_order_mark_only_at_the_start() -> None:
    source = io.BytesIO(b'\xef\xbb\xbf{"x": [[1]]}\n\xef\xbb\xbf{"x": [[2]]}\n')
    first, second = file_lines(source)
    assert isinstance(parse_line(first, "float32"), dict)
    assert isinstance(parse_line(second, "float32"), BadLine)


@pytest.mark.integration
async def test_a_file_is_scored_in_order_with_bad_lines_answered_in_place(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    settings = make_settings(kafka, model_root, None)
    await run_worker(settings)
    rows = np.random.default_rng(0).standard_normal((1200, 32)).astype(np.float32)
    lines = [json.dumps({"x": [row.tolist()]}) for row in rows]
    lines[10] = "{not json"
    lines[20] = json.dumps({"x": [[1.0, 2.0]]})  # the model takes 32 features
    lines[30] = "[1, 2]"
    out = io.StringIO()
    async with SurgeClient(kafka, topic_prefix=settings.worker.topic_prefix) as client:
        report = await score_lines(client, "mlp", lines, out, window=100, in_flight=3)

    results = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["line"] for r in results] == list(range(1, 1201))
    assert (report.lines, report.ok, report.errors, report.timed_out) == (1200, 1197, 3, 0)
    assert [results[i]["code"] for i in (10, 20, 30)] == ["bad_line", "invalid_input", "bad_line"]
    good = [i for i in range(1200) if i not in (10, 20, 30)]
    scored = np.array([results[i]["outputs"]["probs"][0] for i in good], np.float32)
    expected = reference(str(model_root / "mlp" / "1" / "model.onnx"), rows)
    np.testing.assert_allclose(scored, expected[good], rtol=1e-5, atol=1e-6)


@pytest.mark.integration
async def test_a_line_too_large_for_kafka_is_answered_in_place(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    settings = make_settings(kafka, model_root, None)
    await run_worker(settings)
    row = json.dumps({"x": [[0.5] * 32]})
    out = io.StringIO()
    async with SurgeClient(kafka, topic_prefix=settings.worker.topic_prefix) as client:
        report = await score_lines(client, "mlp", [row, HUGE, row], out, window=3)
    results = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r.get("code") for r in results] == [None, "bad_line", None]
    assert "more than Kafka takes" in results[1]["error"]
    assert (report.lines, report.ok, report.errors) == (3, 2, 1)


@pytest.mark.integration
async def test_a_request_kafka_refuses_fails_its_own_line_not_its_window(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    settings = make_settings(kafka, model_root, None)
    topic = settings.worker.topic_prefix + "mlp"
    await create_topics(kafka, topic, configs=SMALL_TOPIC_CONFIGS)
    await run_worker(settings)
    lines = [SMALL_LINE] * 12 + [LARGE_LINE] + [SMALL_LINE] * 12
    out = io.StringIO()
    async with SurgeClient(kafka, topic_prefix=settings.worker.topic_prefix) as client:
        report = await score_lines(client, "mlp", lines, out, window=len(lines))
    results = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["line"] for r in results] == list(range(1, 26))
    assert results[12]["code"] == "too_large"
    assert "max.message.bytes" in results[12]["error"]
    # Kafka refuses a record batch whole: a request that shared the large one's batch is
    # refused with it; the others are answered.
    assert {r.get("code") for r in results} <= {None, "too_large"}
    assert report.ok >= 1, results
    assert (report.lines, report.ok + report.errors) == (25, 25)


@pytest.mark.integration
async def test_non_finite_outputs_are_written_as_null_in_strict_json(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    settings = make_settings(kafka, model_root, None)
    await run_worker(settings)
    lines = [json.dumps({"x": [[None] * 32]}), json.dumps({"x": [[0.5] * 32]})]  # NaN in
    out = io.StringIO()
    async with SurgeClient(kafka, topic_prefix=settings.worker.topic_prefix) as client:
        report = await score_lines(client, "mlp", lines, out)
    assert report.ok == 2
    nan, finite = (msgspec.json.decode(line) for line in out.getvalue().splitlines())
    assert nan["outputs"]["probs"] == [[None] * 10]
    assert all(isinstance(v, float) for v in finite["outputs"]["probs"][0])


async def _served_files(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker], tmp_path: Path
) -> tuple[Path, Path, list[str]]:
    """A worker serving the MLP; the input and output files of a `surge score` run, and the
    options that point it at that worker."""
    settings = make_settings(kafka, model_root, None)
    await run_worker(settings)
    where = ["--bootstrap", kafka, "--topic", settings.worker.topic_prefix + "mlp"]
    return tmp_path / "in.jsonl", tmp_path / "out.jsonl", where


@pytest.mark.integration
async def test_surge_score_writes_a_result_line_per_input_line(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker], tmp_path: Path
) -> None:
    source, results, where = await _served_files(kafka, model_root, run_worker, tmp_path)
    row = json.dumps({"x": [[0.5] * 32]})
    source.write_text("\n".join([row] * 50 + ["", "{oops"]) + "\n")
    scored = await asyncio.to_thread(surge, "score", "mlp", str(source), "-o", str(results), *where)
    assert scored.returncode == 1, scored.stderr  # not every line was scored
    assert "52 lines" in scored.stderr
    assert "50 ok, 2 errors" in scored.stderr
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    # Blank or not, every line of the file has its result line: the numbers stay the file's.
    assert [line.get("code") for line in lines] == [None] * 50 + ["bad_line"] * 2
    assert [line["line"] for line in lines] == list(range(1, 53))
    assert not (tmp_path / "out.jsonl.partial").exists()

    missing = surge("score", "mlp", str(tmp_path / "nowhere.jsonl"), "-o", str(results), *where)
    assert missing.returncode == 2
    assert "nowhere.jsonl" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert len(results.read_text().splitlines()) == 52  # the earlier results are still there


@pytest.mark.integration
async def test_a_run_that_did_not_finish_is_resumed_not_overwritten(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker], tmp_path: Path
) -> None:
    """The results file of an interrupted run is kept: a rerun refuses to start over it, and
    `--resume` answers the lines after its last complete one, numbered as the file's."""
    source, results, where = await _served_files(kafka, model_root, run_worker, tmp_path)
    row = json.dumps({"x": [[0.5] * 32]})
    source.write_text("\n".join(["{oops", row, row, row, row]) + "\n")
    partial = tmp_path / "out.jsonl.partial"
    earlier = (
        '{"line": 1, "code": "bad_line", "error": "earlier"}\n'
        '{"line": 2, "id": "a", "outputs": {"probs": [[0.5]]}}\n'
    )
    partial.write_text(earlier + '{"line": 3, "i')  # killed as it wrote line 3
    refused = surge("score", "mlp", str(source), "-o", str(results), *where)
    assert refused.returncode == 2, refused.stderr
    assert f"{partial} holds the results of a run that did not finish" in refused.stderr
    assert partial.read_text().startswith(earlier)

    resumed = await asyncio.to_thread(
        surge, "score", "mlp", str(source), "-o", str(results), "--resume", *where
    )
    # Every line but the first, a bad line in the earlier run, is scored: the exit status and
    # the summary cover the whole file.
    assert resumed.returncode == 1, resumed.stderr
    assert "resumed after 2 lines (1 ok, 1 errors, 0 timed out): 3 lines" in resumed.stderr
    written = results.read_text()
    assert written.startswith(earlier)  # kept as they were
    lines = [json.loads(line) for line in written.splitlines()]
    assert [line["line"] for line in lines] == [1, 2, 3, 4, 5]
    assert all("outputs" in line for line in lines[2:])
    assert not partial.exists()

    again = surge("score", "mlp", str(source), "-o", str(results), "--resume", *where)
    assert again.returncode == 0, again.stderr
    assert f"{results} is complete: nothing to resume" in again.stderr
    assert results.read_text() == written  # not scored again


@pytest.mark.integration
async def test_surge_score_reads_a_file_that_is_not_all_utf8_line_by_line(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker], tmp_path: Path
) -> None:
    source, results, where = await _served_files(kafka, model_root, run_worker, tmp_path)
    row = json.dumps({"x": [[0.5] * 32]}).encode()
    # A byte-order mark, as some editors write, then a line in Latin-1.
    source.write_bytes(b"\xef\xbb\xbf" + row + b'\n{"x": "caf\xe9"}\n' + row + b"\n")
    scored = await asyncio.to_thread(surge, "score", "mlp", str(source), "-o", str(results), *where)
    assert scored.returncode == 1, scored.stderr
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert [line.get("code") for line in lines] == [None, "bad_line", None]
    assert "not UTF-8" in lines[1]["error"]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(("--window", "0"), "not a positive whole number", id="window-0"),
        pytest.param(("--window", "-5"), "not a positive whole number", id="window-negative"),
        pytest.param(("--datatype", "complex64"), "has no wire datatype", id="complex64"),
        pytest.param(("--datatype", "datetime64"), "has no wire datatype", id="datetime64"),
        pytest.param(("--timeout", "inf"), "a timeout must be more than 0", id="timeout-inf"),
        pytest.param(("--timeout", "nan"), "a timeout must be more than 0", id="timeout-nan"),
        pytest.param(("--timeout", "-1"), "a timeout must be more than 0", id="timeout-negative"),
        pytest.param(("--timeout", "0"), "a timeout must be more than 0", id="timeout-0"),
        pytest.param(("--timeout", "1e300"), "at most 86,400 seconds", id="timeout-1e300"),
        pytest.param(("--timeout", "soon"), "not a number of seconds", id="timeout-word"),
    ],
)
@pytest.mark.parametrize("command", ["score", "shadow"])
def test_score_and_shadow_refuse_bad_options_before_sending(
    tmp_path: Path, command: str, args: tuple[str, ...], message: str
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"x": [[0.5]]}\n')
    extra = ("--candidate", "2") if command == "shadow" else ()
    # Nothing listens on this port: refused before connecting, or it would say so.
    where = ("--bootstrap", "127.0.0.1:9")
    out = surge(command, "mlp", str(source), *args, *extra, *where)
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.integration
@pytest.mark.parametrize("same", ["output", "partial"])
def test_surge_score_refuses_to_write_over_its_input(tmp_path: Path, same: str) -> None:
    source = tmp_path / "data.jsonl"
    source.write_text('{"x": [[0.5]]}\n' * 3)
    output = source if same == "output" else tmp_path / "data"  # data.partial: the input
    if same == "partial":
        source = source.rename(tmp_path / "data.partial")
    out = surge("score", "mlp", str(source), "-o", str(output), "--bootstrap", "127.0.0.1:9")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "would overwrite the input" in out.stderr
    assert len(out.stderr.splitlines()) == 1
    assert source.read_text() == '{"x": [[0.5]]}\n' * 3


@pytest.mark.integration
@pytest.mark.parametrize("command", ["score", "shadow"])
async def test_ctrl_c_stops_a_run_in_one_line_and_keeps_what_it_wrote(
    kafka: str, tmp_path: Path, command: str
) -> None:
    topic = f"test.nobody.{uuid.uuid4().hex[:8]}"  # no worker: the requests wait
    await create_topics(kafka, topic, partitions=1)
    source, results = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text('{oops\n\n{"x": [[0.5]]}\n{"x": [[0.5]]}\n')
    args = [command, "mlp", str(source), "--bootstrap", kafka, "--topic", topic, "--window", "2"]
    args += ["-o", str(results)] if command == "score" else ["--candidate", "2"]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "surge", *args, stdout=PIPE, stderr=PIPE
    )
    try:
        # The second window's requests are out: the first window (two bad lines) is done.
        await read_topic(kafka, topic, until=1, key_of=None)
        process.send_signal(signal.SIGINT)
        _, raw = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
    stderr = raw.decode()
    assert process.returncode == 130, stderr
    assert stderr.startswith("interrupted after 2 lines"), stderr
    assert len(stderr.splitlines()) == 1, stderr
    if command == "score":
        partial = tmp_path / "out.jsonl.partial"
        assert f"results so far in {partial}" in stderr
        assert not results.exists()  # only a finished run has a file by that name
        assert [json.loads(line)["line"] for line in partial.read_text().splitlines()] == [1, 2]


def test_bytes_outputs_are_written_as_text_as_the_worker_writes_them_in_json() -> None:
    assert json_values(np.array([[b"ab", b"\xff"]], dtype=object)) == [["ab", "\ufffd"]]
    assert json_values(np.array([b"ab", b"c"])) == ["ab", "c"]


@pytest.mark.parametrize("cut", [b"", b'{"line": 4, "id": "d", "outputs": [' + b"0.5, " * 30_000])
def test_a_resumed_run_counts_the_complete_result_lines_of_the_one_before(
    tmp_path: Path, cut: bytes
) -> None:
    """Read from the end back to the last complete line, however long the one cut short."""
    complete = (
        b'{"line": 1, "id": "a", "outputs": {"probs": [[0.5]]}}\n'
        b'{"line": 2, "code": "bad_line", "error": "not JSON"}\n'
        b'{"line": 3, "code": "timeout", "error": "no result for c within 30s"}\n'
    )
    partial = tmp_path / "out.jsonl.partial"
    partial.write_bytes(complete + cut)
    earlier = _answered_lines(partial)
    assert (earlier.lines, earlier.ok, earlier.errors, earlier.timed_out) == (3, 1, 1, 1)
    assert partial.read_bytes() == complete
    partial.write_bytes(cut)  # killed as it wrote the first line
    assert _answered_lines(partial).lines == 0
    assert partial.read_bytes() == b""


def test_a_workers_timeout_result_counts_as_an_error_not_as_no_result() -> None:
    report = ScoreReport()
    lines = [
        {"line": 1, "id": "a", "code": "timeout", "error": "the batch outlived its budget"},
        {"line": 2, "code": "timeout", "error": "no result for b within 30s"},
    ]
    _write(lines, io.StringIO(), report)
    assert (report.errors, report.timed_out) == (1, 1)
