"""The embedded zero-set-up broker (noida-db): good for a first run, not for production."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient


class NoidaError(RuntimeError):
    """noida-db could not start; the message says why, for the user."""


class PortInUse(NoidaError):
    """Something else listens on the port asked for."""


def _binary() -> str:
    """The noida-db installed beside this Python (the pinned one), else one on PATH."""
    beside = Path(sys.executable).with_name("noida-db")
    found = str(beside) if beside.exists() else shutil.which("noida-db")
    if found is None:
        raise NoidaError("noida-db is not installed: pip install noida-db")
    return found


def start_noida(
    data_dir: Path,
    port: int,
    *,
    timeout: float = 30,
    log_path: Path | None = None,
    stop_with: contextlib.ExitStack | None = None,
) -> subprocess.Popen[bytes]:
    """Start noida-db's Kafka endpoint in its own process group, ready to serve; its output
    goes to `log_path` (default: noida.log in `data_dir`). Interrupted while it starts, it
    stops the broker again: in a session of its own, a terminal's Ctrl-C never reaches it.
    `stop_with` gets the broker's stop as soon as it has a pid, so that a Ctrl-C just after
    this returns cannot leave it running."""
    if not 1 <= port <= 65535:
        raise NoidaError(f"port {port} is not a TCP port (1-65535)")
    # Another broker on the port would answer the readiness check in noida-db's place.
    if _port_taken(port):
        raise PortInUse(f"port {port} is already in use")
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_path or data_dir / "noida.log"
    with ctrl_c_held() as held, log_path.open("ab") as log:
        process = subprocess.Popen(
            [
                _binary(),
                "start",
                "--data-dir",
                str(data_dir),
                "--only",
                "kafka",
                "--kafka-port",
                str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its console script runs the real binary as a child
        )
        if stop_with is not None:
            stop_with.callback(stop_noida, process)
    deadline = time.monotonic() + timeout
    try:
        if held:
            signal.raise_signal(signal.SIGINT)  # as it would have been, now there is a pid
        # Alive first: only the process we started may count as ready.
        while process.poll() is None and not asyncio.run(_serves_metadata(f"127.0.0.1:{port}")):
            if time.monotonic() > deadline:
                raise NoidaError(f"noida-db did not start within {timeout:g}s; see {log_path}")
            time.sleep(0.2)
    except BaseException:  # not ready in time, or Ctrl-C: nothing left behind
        stop_noida(process)
        raise
    if process.returncode is not None:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-5:])
        raise NoidaError(
            f"noida-db exited with status {process.returncode}; the end of {log_path}:\n{tail}"
        )
    return process


@contextlib.contextmanager
def ctrl_c_held() -> Iterator[list[int]]:
    """Hold Ctrl-C (and SIGTERM taken as Ctrl-C) back while a process is made and its stop
    registered: one that came between the fork and `Popen` returning would leave a process
    whose pid no one knows. The signals held are listed in what it yields."""
    held: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # signals go to main
        yield held
        return
    previous = signal.signal(signal.SIGINT, lambda signum, _: held.append(signum))
    try:
        yield held
    finally:
        signal.signal(signal.SIGINT, previous)


def stop_noida(process: subprocess.Popen[bytes], *, timeout: float = 15) -> None:
    """SIGTERM the whole group and wait until all of it is gone (SIGKILL past `timeout`):
    noida-db saves its state on a clean stop, in the real binary its console script runs as
    a child, which outlives the script by the time that takes."""
    group = process.pid  # its own session: the group has the script's pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _group_alive(group):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
            break
        process.poll()  # reap the script, or the group looks alive while it is a zombie
        time.sleep(0.05)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def _port_taken(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


async def _serves_metadata(bootstrap: str) -> bool:
    """The port opens before data is loaded: only a real metadata answer counts as ready."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # "connection refused" is the expected answer for a while
    try:
        await admin.start()
        await admin.list_topics()
        return True
    except Exception:
        return False
    finally:
        await admin.close()
        quiet.setLevel(level)
