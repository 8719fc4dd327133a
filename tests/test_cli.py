"""The `surge` command as users run it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from surge.broker import _port_taken
from surge.main import _connect
from tests.conftest import WorkerProcess, topic_of, worker_env
from tests.helpers import read_topic
from tests.services import free_port, make_certificates

pytestmark = pytest.mark.integration


def surge(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "surge", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ | env if env else None,
    )


def test_worker_refuses_a_bad_config_with_one_line_per_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[worker]\nmax_in_flight = -1\ncolour = "blue"\n')
    out = surge("worker", "--config", str(path))
    assert out.returncode == 2
    assert "worker.max_in_flight" in out.stderr
    assert "worker.colour: unknown field" in out.stderr


def test_worker_refuses_a_redis_url_option_redis_py_does_not_know_at_start_up() -> None:
    """Not at its first Redis result, after taking requests in, and again at every restart."""
    env = {"SURGE_METRICS__PORT": "0", "SURGE_REDIS__URL": "redis://127.0.0.1:9/0?timeout=5"}
    out = surge("worker", env=env)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "redis url: " in out.stderr
    assert "'timeout'" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_predict_prints_the_result(
    kafka: str, model_root: Path, worker_processes: type[WorkerProcess], event_loop: str
) -> None:
    env = worker_env(kafka, model_root, None, SURGE_WORKER__EVENT_LOOP=event_loop)
    worker = worker_processes(env)  # type: ignore[call-arg]
    worker.wait_for("worker_started")
    started = next(e for e in worker.events() if e.get("event") == "worker_started")
    assert started["event_loop"] == event_loop
    row = json.dumps([[0.1] * 32])
    route = ("--bootstrap", kafka, "--topic", topic_of(env, "mlp"))
    out = surge("predict", "mlp", "--input", f"x={row}", *route)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["model_name"] == "mlp"
    assert len(result["outputs"]["probs"][0]) == 10

    bad = surge("predict", "mlp", "--input", "x=[[1, 2]]", *route)
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["code"] == "invalid_input"

    # NaN in (null, as JSON writes it), NaN out: written as null, which JSON can read.
    nan = surge("predict", "mlp", "--input", f"x={json.dumps([[None] * 32])}", *route)
    assert nan.returncode == 0, nan.stderr
    strict = json.loads(nan.stdout, parse_constant=_refuse)
    assert strict["outputs"]["probs"] == [[None] * 10]


def _refuse(token: str) -> None:
    raise AssertionError(f"{token} is not JSON")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(("nobody", "-i", "x=[[1, 2]]"), "no result within 1s", id="no-worker"),
        pytest.param(("mlp", "-i", "x=[[1,2"), "--input x: not valid JSON", id="bad-json"),
        pytest.param(("mlp", "-i", "x"), "expected NAME=JSON", id="no-name"),
        pytest.param(("mlp", "-i", "x=[[1], [2, 3]]"), "not an array of float32", id="ragged"),
        pytest.param(("mlp", "--datatype", "floaty"), "--datatype 'floaty'", id="bad-dtype"),
        pytest.param(
            ("mlp", "--datatype", "complex64", "-i", "x=[[1]]"),
            "--datatype 'complex64' has no wire datatype",
            id="no-wire-dtype",
        ),
        pytest.param(
            ("mlp", "--datatype", "int8", "-i", "x=[[300]]"),
            "--input x: not an array of int8",
            id="int8-overflow",
        ),
        pytest.param(("mlp", "-i", "x=[[1e300]]"), "not an array of float32", id="1e300-f32"),
        pytest.param(
            ("mlp", "--datatype", "int64", "-i", "x=[[1.7]]"),
            "--input x: not an array of int64 (data is not INT64: it holds fractions)",
            id="fraction-as-int64",
        ),
        pytest.param(
            ("mlp", "--datatype", "int32", "-i", 'x=[["12"]]'),
            "--input x: not an array of int32",
            id="text-as-int32",
        ),
        pytest.param(
            ("mlp", "--datatype", "bool", "-i", "x=[[0.5]]"),
            "--input x: not an array of bool",
            id="half-as-bool",
        ),
        pytest.param(("mlp", "-i", "x=" + "[" * 50_000), "--input x: not valid JSON", id="deep"),
        pytest.param(("mlp", "-i", "x=1"), "--input x: not an array of float32 (a scalar", id="1"),
        pytest.param(("mlp", "--via", "redis"), "--via redis needs --redis-url", id="no-redis"),
    ],
)
def test_predict_explains_a_mistake_in_one_line(
    kafka: str, args: tuple[str, ...], message: str
) -> None:
    out = surge("predict", *args, "--bootstrap", kafka, "--timeout", "1")
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("timeout", "message"),
    [
        pytest.param("inf", "a timeout must be more than 0", id="inf"),
        pytest.param("nan", "a timeout must be more than 0", id="nan"),
        pytest.param("-1", "a timeout must be more than 0", id="negative"),
        pytest.param("0", "a timeout must be more than 0", id="zero"),
        pytest.param("1e300", "at most 86,400 seconds", id="1e300"),
        pytest.param("soon", "not a number of seconds", id="word"),
    ],
)
def test_predict_refuses_a_timeout_that_is_not_a_positive_number(
    timeout: str, message: str
) -> None:
    # Nothing listens on this port: refused before connecting, or it would say so.
    out = surge(
        "predict", "mlp", "-i", "x=[[1]]", "--bootstrap", "127.0.0.1:9", "--timeout", timeout
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("command", "message"),
    [
        pytest.param(
            ("predict", "mlp", "-i", "x=[[1]]", "--bootstrap", "host:notaport"),
            "argument --bootstrap: bootstrap servers 'host:notaport': 'notaport' is not a port",
            id="predict-port",
        ),
        pytest.param(
            ("dlq", "inspect", "--bootstrap", "a:1,:"),
            "argument --bootstrap: bootstrap servers 'a:1,:': an entry without a host",
            id="dlq-empty-entry",
        ),
        pytest.param(
            ("lag", "--bootstrap", "host:70000"),
            "'70000' is not a port",
            id="lag-port-range",
        ),
        pytest.param(
            ("predict", "mlp", "-i", "x=[[1]]", "--via", "redis", "--redis-url", "localhost"),
            "argument --redis-url: redis url 'localhost' must start with redis://",
            id="redis-scheme",
        ),
        pytest.param(
            ("dlq", "replay", "--dry-run", "--redis-url", "notaurl"),
            "argument --redis-url: redis url 'notaurl' must start with redis://",
            id="replay-redis-scheme",
        ),
        pytest.param(
            ("dlq", "inspect", "--bootstrap", "a:b:c"),
            "argument --bootstrap: bootstrap servers 'a:b:c': 'a:b:c' is not host:port",
            id="two-colons",
        ),
        pytest.param(
            ("lag", "--bootstrap", "[::1"),
            "argument --bootstrap: bootstrap servers '[::1': '[::1' is not [host]:port",
            id="ipv6-unclosed",
        ),
        pytest.param(
            ("predict", "mlp", "-i", "x=[[1]]", "--via", "redis", "--redis-url", "redis://h:abc/0"),
            "argument --redis-url: redis url 'redis://h:abc/0': Port could not be cast",
            id="redis-port",
        ),
        pytest.param(("broker", "--port", "70000"), "'70000' is not a TCP port", id="broker-port"),
        pytest.param(
            ("demo", "--requests", "-1"), "'-1' is not a positive whole number", id="demo-count"
        ),
        pytest.param(
            ("demo", "--rate", "nan"),
            "'nan' is not a positive number of requests a second",
            id="demo-rate",
        ),
        pytest.param(
            ("dlq", "replay", "--dry-run", "--reply-to", "bad topic!"),
            "argument --reply-to: 'bad topic!' is no Kafka topic name (nor 'redis')",
            id="replay-reply-to",
        ),
    ],
)
def test_an_address_no_client_could_use_is_refused_in_one_line(
    command: tuple[str, ...], message: str
) -> None:
    out = surge(*command)
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_a_worker_s_bootstrap_servers_are_checked_at_start_up() -> None:
    out = surge("worker", env={"SURGE_KAFKA__BOOTSTRAP_SERVERS": "kafka:x"})
    assert out.returncode == 2, out.stdout + out.stderr
    assert "kafka: bootstrap servers 'kafka:x': 'x' is not a port" in out.stderr
    assert "Traceback" not in out.stderr


def test_predict_explains_an_unreachable_broker() -> None:
    out = surge("predict", "mlp", "--bootstrap", f"127.0.0.1:{free_port()}", "--timeout", "5")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Kafka at 127.0.0.1:" in out.stderr
    assert "Traceback" not in out.stderr


def test_predict_s_timeout_bounds_reaching_a_broker_that_never_answers() -> None:
    """A listener that takes connections and says nothing (a wrong port behind a proxy):
    the timeout given is the whole command's, connecting included."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        started = time.monotonic()
        out = surge(
            "predict", "mlp", "-i", "x=[[1]]", "--bootstrap", f"127.0.0.1:{port}", "--timeout", "2"
        )
        elapsed = time.monotonic() - started
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"Kafka at 127.0.0.1:{port}: no answer within 2s" in out.stderr
    assert elapsed < 10  # the interpreter's start-up, and 2 s
    assert "Traceback" not in out.stderr


def test_demo_runs_end_to_end_on_the_embedded_broker(tmp_path: Path) -> None:
    # A user's settings for their own cluster are not the demo's: its worker ignores them.
    env = {"TMPDIR": str(tmp_path), "SURGE_KAFKA__SECURITY_PROTOCOL": "SASL_SSL"}
    out = surge("demo", "--requests", "2000", "--rate", "200", env=env, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2,000 │   2,000" in out.stdout  # every request of the burst got its result
    assert "rows per model call" in out.stdout
    # The broker's data and the model go; the logs, which the messages name, stay.
    (workdir,) = tmp_path.glob("surge-demo-*")
    assert sorted(p.name for p in workdir.iterdir()) == ["noida.log", "worker.log"]
    assert f"worker log: {workdir / 'worker.log'}" in out.stdout.replace("\n", "")


def test_broker_refuses_a_port_another_broker_holds(kafka: str, tmp_path: Path) -> None:
    port = kafka.rsplit(":", 1)[1]
    out = surge("broker", "--port", port, "--data-dir", str(tmp_path / "noida"))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "embedded broker" not in out.stdout
    assert f"port {port} is already in use" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("stop", "started_with"),
    [
        (signal.SIGTERM, signal.SIG_DFL),
        (signal.SIGINT, signal.SIG_DFL),
        # As a shell starts a background job (`surge broker &` in a script, nohup): Ctrl-C
        # ignored, which SIGTERM, taken as Ctrl-C, must not inherit.
        (signal.SIGTERM, signal.SIG_IGN),
        (signal.SIGHUP, signal.SIG_DFL),  # the terminal closed
    ],
    ids=["SIGTERM", "SIGINT", "SIGTERM-in-the-background", "SIGHUP"],
)
def test_a_stopped_broker_command_stops_its_broker(
    tmp_path: Path, stop: signal.Signals, started_with: signal.Handlers
) -> None:
    """The broker runs in a process group of its own: stopped with SIGTERM (as a service
    manager stops it) as with Ctrl-C, `surge broker` stops it, port and data with it."""
    port = free_port()
    data = tmp_path / "noida"

    def as_started() -> None:
        signal.signal(signal.SIGINT, started_with)
        # From a terminal, whatever this test runs under (`nohup` ignores SIGHUP).
        signal.signal(signal.SIGHUP, signal.SIG_DFL)

    process = subprocess.Popen(
        [sys.executable, "-m", "surge", "broker", "--port", str(port), "--data-dir", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=as_started,
    )
    try:
        assert process.stdout is not None
        assert "embedded broker" in process.stdout.readline().decode()  # serving by now
        process.send_signal(stop)
        assert process.wait(30) == 0
        deadline = time.monotonic() + 10
        while _port_taken(port):
            assert time.monotonic() < deadline, f"the broker still holds port {port}"
            time.sleep(0.1)
    finally:
        process.kill()
        process.wait()


def test_a_demo_stopped_with_sigterm_stops_what_it_started(tmp_path: Path) -> None:
    """As with Ctrl-C: a service manager's or a CI runner's SIGTERM stops the demo's worker and
    its embedded broker too, and removes the broker's data."""
    env = os.environ | {"TMPDIR": str(tmp_path)}
    demo = subprocess.Popen(
        [sys.executable, "-m", "surge", "demo", "--requests", "2000000", "--rate", "10"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    started: list[psutil.Process] = []
    try:
        parent = psutil.Process(demo.pid)
        deadline = time.monotonic() + 60
        while len(started := parent.children(recursive=True)) < 3:  # worker, noida-db (2)
            assert demo.poll() is None, demo.stderr.read() if demo.stderr else ""
            assert time.monotonic() < deadline, "the demo started no worker and broker"
            time.sleep(0.2)
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(60) == 130
        assert demo.stderr is not None
        stderr = demo.stderr.read().decode()
        assert "Traceback" not in stderr, stderr
        _, alive = psutil.wait_procs(started, timeout=15)
        assert not alive, f"outlived the demo: {[p.cmdline() for p in alive]}"
        assert not list(tmp_path.glob("surge-demo-*/broker"))
    finally:
        for process in [demo, *started]:  # failed: nothing left behind
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        demo.wait()


def test_demo_stops_at_once_when_its_worker_dies(tmp_path: Path) -> None:
    # A worker that exits at once, as one refusing to start does. TMPDIR holds the demo's
    # own files.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, sys\nif sys.argv[1:2] == ['worker']:\n    os._exit(2)\n"
    )
    env = {"PYTHONPATH": str(site), "TMPDIR": str(tmp_path)}
    started = time.monotonic()
    out = surge("demo", "--requests", "10", "--rate", "10", env=env, timeout=90)
    assert time.monotonic() - started < 30
    assert out.returncode == 1, out.stdout + out.stderr  # a failed demo, as the README says
    assert "Traceback" not in out.stderr
    (log,) = tmp_path.glob("surge-demo-*/worker.log")
    assert f"exited with status 2 before serving; see {log}" in out.stderr
    # noida-db runs in a session of its own: nothing started from the demo may outlive it,
    # not even for the time it takes to save its state.
    leftover = subprocess.run(["pgrep", "-af", str(tmp_path)], capture_output=True, text=True)
    assert leftover.returncode == 1, f"outlived the demo: {leftover.stdout}"


def test_a_broker_command_stopped_while_its_broker_starts_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    data = tmp_path / "noida"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "surge",
            "broker",
            "--port",
            str(free_port()),
            "--data-dir",
            str(data),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        parent = psutil.Process(process.pid)
        deadline = time.monotonic() + 30
        while not parent.children(recursive=True):  # noida-db launched, not serving yet
            assert time.monotonic() < deadline, "no broker was started"
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) in (0, 130)  # 0: it was serving already, and stopped
        leftover = subprocess.run(["pgrep", "-af", str(data)], capture_output=True, text=True)
        assert leftover.returncode == 1, f"outlived `surge broker`: {leftover.stdout}"
    finally:
        process.kill()
        process.wait()


def test_ctrl_c_while_a_prediction_waits_is_one_line(kafka: str) -> None:
    """No worker answers: the call waits until Ctrl-C, which ends it without a traceback."""
    topic = f"test.unserved.{uuid.uuid4().hex[:8]}"
    predict = ("predict", "mlp", "-i", "x=[[1]]", "--topic", topic, "--timeout", "120")
    process = subprocess.Popen(
        [sys.executable, "-m", "surge", *predict, "--bootstrap", kafka],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:  # sent: waiting for its result now
        assert asyncio.run(read_topic(kafka, topic, until=1, timeout=60, key_of=None))
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().endswith("predict interrupted"), stderr


@pytest.mark.parametrize("given", [None, "redis://elsewhere:6379/0"])
def test_client_commands_take_the_workers_redis_from_their_settings_unless_given_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: str | None
) -> None:
    """The URL, its credentials and TLS files and the key prefix come together: a URL given
    on the command line takes none of the settings' TLS files, which a plain connection
    would refuse."""
    for name in [n for n in os.environ if n.startswith("SURGE_")]:
        monkeypatch.delenv(name)
    ca = make_certificates(tmp_path) / "ca.pem"
    config = tmp_path / "worker.toml"
    config.write_text(
        f'[redis]\nurl = "rediss://cache:6380/0"\npassword = "secret"\n'
        f'ssl_ca_certs = "{ca}"\nkey_prefix = "app:"\n'
    )
    args = argparse.Namespace(config=config, bootstrap=None, redis_url=given, redis_prefix=None)
    assert _connect(args) == 0
    assert args.redis_prefix == "app:"
    if given is None:
        assert args.redis_url == "rediss://cache:6380/0"
        assert args.redis_options["password"] == "secret"
        assert args.redis_options["ssl_ca_certs"] == str(ca)
    else:
        assert (args.redis_url, args.redis_options) == (given, {})


def test_client_commands_send_records_as_large_as_the_workers_settings_allow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.startswith("SURGE_")]:
        monkeypatch.delenv(name)
    config = tmp_path / "worker.toml"
    config.write_text("[kafka]\nmax_request_size = 10485760\n")
    args = argparse.Namespace(config=config, bootstrap=None)
    assert _connect(args) == 0
    assert args.sending_options["max_request_size"] == 10_485_760
    assert "max_request_size" not in args.kafka_options  # a consumer would refuse it


@pytest.mark.parametrize("processes", ["100000", "99999999999999999999999"])
def test_a_pool_of_more_processes_than_the_machine_could_run_is_refused(processes: str) -> None:
    most = 4 * len(os.sched_getaffinity(0))
    out = surge("worker", "--processes", processes, timeout=30)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"at most {most} (4 per CPU this may use)" in out.stderr
    assert "Traceback" not in out.stderr
