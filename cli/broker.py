"""The embedded zero-set-up broker (noida-db): good for a first run, not for production."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient


class NoidaError(RuntimeError):
    """noida-db could not start; the message says why, for the user."""


def _binary() -> str:
    found = shutil.which("noida-db") or str(Path(sys.executable).with_name("noida-db"))
    if not Path(found).exists():
        raise NoidaError("noida-db is not installed: pip install noida-db")
    return found


def start_noida(data_dir: Path, port: int, *, timeout: float = 30) -> subprocess.Popen[bytes]:
    """Start noida-db's Kafka endpoint in its own process group, ready to serve."""
    # Another broker on the port would answer the readiness check in noida-db's place.
    if _port_taken(port):
        raise NoidaError(f"port {port} is already in use: pick another with --port")
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "noida.log"
    with log_path.open("ab") as log:
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
    deadline = time.monotonic() + timeout
    # Alive first: only the process we started may count as ready.
    while process.poll() is None and not asyncio.run(_serves_metadata(f"127.0.0.1:{port}")):
        if time.monotonic() > deadline:
            stop_noida(process)
            raise NoidaError(f"noida-db did not start within {timeout:g}s; see {log_path}")
        time.sleep(0.2)
    if process.returncode is not None:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-5:])
        raise NoidaError(
            f"noida-db exited with status {process.returncode}; the end of {log_path}:\n{tail}"
        )
    return process


def stop_noida(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the whole group: noida-db saves its state on a clean stop."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(15)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


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
