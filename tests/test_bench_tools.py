"""The benchmarks' own instruments: the broker's GC pauses, a process's CPU and CPU wait,
which local process serves a bootstrap address, and a worker process that fails early."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from bench.common import WorkerProcess, gc_pauses, gc_pauses_ms, listener_pid, scheduling

# Lines of a real G1 log (`-Xlog:gc`): pauses, and concurrent phases that are not pauses.
_G1_LOG = """\
[0.852s][info][gc] GC(6) Concurrent Mark Cycle 20.364ms
[0.923s][info][gc] GC(7) Pause Young (Prepare Mixed) (G1 Evacuation Pause) 19M->9M(256M) 2.295ms
[1.187s][info][gc] GC(10) Concurrent Mark Cycle
[1.206s][info][gc] GC(10) Pause Remark 13M->13M(256M) 3.153ms
[1.216s][info][gc] GC(10) Pause Cleanup 14M->14M(256M) 0.070ms
[1.218s][info][gc] GC(10) Concurrent Mark Cycle 30.707ms
[1.794s][info][gc] GC(14) Pause Young (Concurrent Start) (G1 Humongous) 38M->29M(256M) 5.686ms
[1.794s][info][gc] GC(15) Concurrent Undo Cycle 0.244ms
[2.001s][info][gc] GC(16) Pause Full (Allocation Failure) 250M->40M(256M) 120ms
"""


def test_gc_pauses_are_the_stop_the_world_lines(tmp_path: Path) -> None:
    log = tmp_path / "gc.log"
    log.write_text(_G1_LOG)
    assert gc_pauses_ms(log) == [2.295, 3.153, 0.070, 5.686, 120.0]
    assert gc_pauses_ms(tmp_path / "absent.log") == []
    assert gc_pauses(log)[0] == (0.923, 2.295)  # with when, in the JVM's uptime


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="Linux schedstat")
def test_scheduling_counts_a_process_s_cpu() -> None:
    ran, waited = scheduling(os.getpid())
    deadline = time.thread_time() + 0.05
    while time.thread_time() < deadline:  # 50 ms of CPU on this thread
        pass
    ran_after, waited_after = scheduling(os.getpid())
    assert ran_after - ran >= 0.045
    assert waited_after >= waited


def test_listener_pid_finds_the_local_process_behind_a_bootstrap_address() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert listener_pid(f"127.0.0.1:{port}") == os.getpid()
        assert listener_pid(f"localhost:{port},127.0.0.1:{port + 1}") == os.getpid()
        assert listener_pid(f"192.0.2.1:{port}") is None  # another host's port of that number
    assert listener_pid(f"127.0.0.1:{port}") is None


@pytest.mark.integration
def test_a_worker_that_exits_fails_the_wait_at_once_with_its_log(
    kafka: str, tmp_path: Path
) -> None:
    worker = WorkerProcess(kafka, tmp_path, SURGE_WORKER__FETCH_AHEAD_S="-1")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"exited \(2\)(.|\n)*fetch_ahead_s"):
        worker.first_result("mlp", {"x": np.zeros((1, 32), np.float32)}, timeout_s=60)
    assert time.monotonic() - started < 30
