"""The benchmarks' own instruments: the broker's GC pauses, a process's CPU and CPU wait,
which local process serves a bootstrap address, a worker process that fails early, and a
pool's batch figures summed over its members."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.common import (
    WorkerProcess,
    _threads,
    free_ports,
    gc_pauses,
    gc_pauses_ms,
    listener_pid,
    scheduling,
)
from tests.conftest import topic_of, worker_env
from tests.helpers import create_topics, mlp_requests, publish, read_topic

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
    """Read on this thread: the process's sums drop whenever another of its threads ends."""
    this = str(threading.get_native_id())
    _, ran, waited = _threads(os.getpid())[this]
    deadline = time.thread_time() + 0.05
    while time.thread_time() < deadline:  # 50 ms of CPU on this thread
        pass
    _, ran_after, waited_after = _threads(os.getpid())[this]
    assert ran_after - ran >= 0.045
    assert waited_after >= waited
    assert scheduling(os.getpid())[0] >= ran_after  # every thread's, this one's included


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


def test_free_ports_are_free_together() -> None:
    first = free_ports(3)
    for port in range(first, first + 3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free, all three


def _member_rows(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "surge_batch_rows_sum"
    )


@pytest.mark.integration
async def test_a_pool_s_batch_figures_add_up_over_its_members(kafka: str, model_root: Path) -> None:
    env = worker_env(kafka, model_root, None)
    topic, run = topic_of(env, "mlp"), uuid.uuid4().hex[:8]
    replies = f"test.replies.{run}"
    await create_topics(kafka, topic, replies)
    worker = WorkerProcess(kafka, model_root, processes=2, **env)
    try:
        # Both members hold partitions: the last two assignments split the topic's four.
        deadline = time.monotonic() + 90
        while True:
            lines = worker.log.read_text(errors="replace").splitlines()
            events = [json.loads(line) for line in lines if line.startswith("{")]
            held = [e["partitions"] for e in events if e.get("event") == "partitions_assigned"]
            if len(held) >= 2 and all(held[-2:]) and len({*held[-2], *held[-1]}) == 4:
                break
            assert time.monotonic() < deadline, "\n".join(lines[-30:])
            await asyncio.sleep(0.2)
        await publish(kafka, mlp_requests(topic, run, 400, replies))
        assert len(await read_topic(kafka, replies, until=400)) == 400
        each = [_member_rows(worker.metrics_port + i) for i in range(2)]
        assert all(rows > 0 for rows in each), each
        assert worker.batch_totals()["rows"] == sum(each) == 400
    finally:
        worker.stop()


def test_compare_pairs_surge_with_each_contender_round_by_round() -> None:
    from bench.compare import Result, summarise

    def result(throughput: float) -> Result:
        return Result("x", "x", "none", 10, 10, 0, 0, 1.0, throughput, 10.0)

    loop = [result(100.0), result(50.0), result(200.0)]
    surge = [result(60.0), result(90.0), result(150.0)]
    summary = summarise(loop, surge)
    assert summary.throughput == 100.0
    assert summary.surge_ratios == [0.6, 1.8, 0.75]
    # Paired by round, not the ratio of the medians (90 ÷ 100).
    assert summary.surge_ratio == 0.75
    assert summarise(surge, surge).surge_ratio == 1.0
