"""`surge worker --processes N`: a pool of worker processes in one consumer group, restarted
when one dies, drained together on SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import psutil
import pytest

from surge.config import load_settings
from surge.pool import _Member, member_cpus, member_envs
from surge.workers.runtimes import devices
from tests.conftest import ROOT, topic_of, worker_env
from tests.helpers import create_topics, mlp_requests, publish, read_topic

pytestmark = pytest.mark.integration


def _events(log: Path, name: str) -> list[dict[str, object]]:
    lines = log.read_text(errors="replace").splitlines()
    events = [json.loads(line) for line in lines if line.startswith("{")]
    return [e for e in events if e.get("event") == name]


def _wait(log: Path, name: str, count: int, timeout: float = 60) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while len(found := _events(log, name)) < count:
        assert time.monotonic() < deadline, f"{name} ×{count} never logged:\n{log.read_text()}"
        time.sleep(0.1)
    return found


def _start_pool(env: dict[str, str], log: Path, processes: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "surge", "worker", "--processes", processes],
        env=os.environ | env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
        cwd=ROOT,
    )


async def test_a_pool_serves_restarts_and_drains(
    kafka: str, model_root: Path, tmp_path: Path
) -> None:
    env = worker_env(kafka, model_root, None)
    topic, run = topic_of(env, "mlp"), uuid.uuid4().hex[:8]
    replies = f"test.replies.{run}"
    await create_topics(kafka, topic, replies)
    log = tmp_path / "pool.log"
    pool = _start_pool(env, log, "2")
    try:
        started = _wait(log, "pool_member_started", 2)
        _wait(log, "worker_started", 2)
        # Each member runs on its own share of the CPUs, not on every core.
        shares = [os.sched_getaffinity(int(e["pid"])) for e in started]  # type: ignore[call-overload]
        assert shares[0] | shares[1] == os.sched_getaffinity(0)
        assert not shares[0] & shares[1]
        await publish(kafka, mlp_requests(topic, run, 400, replies))
        assert len(await read_topic(kafka, replies, until=400)) == 400

        os.kill(int(started[0]["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
        _wait(log, "pool_member_exited", 1)
        _wait(log, "pool_member_started", 3)  # member 0 again
        _wait(log, "worker_started", 3)
    finally:
        pool.send_signal(signal.SIGTERM)
        code = pool.wait(60)
    assert code == 0  # every member drained and exited cleanly
    assert len(_wait(log, "worker_stopped", 2)) >= 2


def test_one_member_per_visible_gpu_each_with_its_own_metrics_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = load_settings(env={"SURGE_METRICS__PORT": "9400"})
    seen = 2  # GPUs the driver sees, of those CUDA_VISIBLE_DEVICES lists
    monkeypatch.setattr(devices, "cuda_device_count", lambda: seen)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    envs = member_envs(settings, "gpus")
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["2", "5"]
    assert [e["SURGE_METRICS__PORT"] for e in envs] == ["9400", "9401"]
    seen = 1  # the list names a GPU this node does not have
    assert [e["CUDA_VISIBLE_DEVICES"] for e in member_envs(settings, "gpus")] == ["2"]
    seen = 0  # no GPU at all, whatever the list says: one member, on the CPU
    cpu_only = [{"SURGE_POOL_MEMBER": "0", "SURGE_METRICS__PORT": "9400"}]
    assert member_envs(settings, "gpus") == cpu_only
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert member_envs(settings, "gpus") == cpu_only
    assert len(member_envs(settings, "3")) == 3
    last = load_settings(env={"SURGE_METRICS__PORT": "65535"})
    with pytest.raises(ValueError, match="up to 65536"):
        member_envs(last, "2")


def test_a_pool_stopped_while_its_members_start_exits_cleanly(
    kafka: str, model_root: Path, tmp_path: Path
) -> None:
    """A member stopped by the forwarded SIGTERM before it could install its handler stopped
    as asked: not a failure of the pool."""
    log = tmp_path / "pool.log"
    pool = _start_pool(worker_env(kafka, model_root, None), log, "2")
    try:
        _wait(log, "pool_member_started", 2)
        pool.send_signal(signal.SIGTERM)
        assert pool.wait(60) == 0
    finally:
        _leave_nothing(pool)


def test_members_of_a_killed_pool_stop(kafka: str, model_root: Path, tmp_path: Path) -> None:
    """SIGKILL leaves the pool no chance to stop its members: they notice and stop on their
    own, rather than run on unsupervised, holding the metrics ports a new pool needs."""
    log = tmp_path / "pool.log"
    pool = _start_pool(worker_env(kafka, model_root, None), log, "2")
    members: list[int] = []
    try:
        members = [int(e["pid"]) for e in _wait(log, "pool_member_started", 2)]  # type: ignore[call-overload]
        _wait(log, "worker_started", 2)
        pool.kill()
        pool.wait()
        deadline = time.monotonic() + 60
        while alive := [pid for pid in members if _running(pid)]:
            assert time.monotonic() < deadline, f"members {alive} outlived their pool"
            time.sleep(0.2)
    finally:
        _leave_nothing(pool, members)
    assert len(_events(log, "worker_stopped")) == 2  # each drained and committed


def _leave_nothing(pool: subprocess.Popen[bytes], members: Iterable[int] = ()) -> None:
    """After a test, passed or failed: the pool and its members, killed if still running, so
    that none takes the CPU from the tests after it."""
    pids = set(members)
    with contextlib.suppress(psutil.NoSuchProcess):
        pids |= {child.pid for child in psutil.Process(pool.pid).children(recursive=True)}
    if pool.poll() is None:
        pool.kill()
        pool.wait()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not reaped) is not running
        return f.read().split()[2] != "Z"


_FAILING_RESTARTS = """
import sys
from surge import pool

started = pool._Member.start


def start(self):
    if self.process is not None:  # a restart: the pool's CPUs gone, fork refused, say
        raise OSError(11, "Resource temporarily unavailable")
    started(self)


pool._Member.start = start
from surge.main import main

sys.argv = ["surge", "worker", "--processes", "2"]
main()
"""


def test_a_member_that_cannot_be_started_again_stops_the_pool_supervised(
    kafka: str, model_root: Path, tmp_path: Path
) -> None:
    """The other member drains and stops as on SIGTERM, rather than run on unsupervised
    after the pool died of the error."""
    log = tmp_path / "pool.log"
    pool = subprocess.Popen(
        [sys.executable, "-c", _FAILING_RESTARTS],
        env=os.environ | worker_env(kafka, model_root, None),
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
        cwd=ROOT,
    )
    members: list[int] = []
    try:
        members = [int(e["pid"]) for e in _wait(log, "pool_member_started", 2)]  # type: ignore[call-overload]
        _wait(log, "worker_started", 2)
        os.kill(members[0], signal.SIGKILL)
        assert pool.wait(90) == 1
        still = _running(members[1])
    finally:
        _leave_nothing(pool, members)
    assert _events(log, "pool_member_start_failed")
    assert not still
    assert len(_events(log, "worker_stopped")) == 1  # the other drained and committed
    assert "Traceback" not in log.read_text()


def test_cpu_members_share_the_pool_s_cpus_in_contiguous_shares(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 6, 7})
    assert member_cpus(1) == [{0, 1, 2, 3, 4, 6, 7}]
    assert member_cpus(3) == [{0, 1, 2}, {3, 4}, {6, 7}]
    assert member_cpus(9)[6:] == [{7}, {0}, {1}]  # more members than CPUs: round them


def test_a_member_that_keeps_exiting_gives_the_pool_up() -> None:
    member = _Member(0, ["true"], {})
    assert not any(member.exited(now) for now in (0.0, 80.0, 160.0, 240.0, 320.0, 400.0, 480.0))
    assert member.exited(560.0)  # the eighth exit within ten minutes

    spread = _Member(1, ["true"], {})
    assert not any(spread.exited(now) for now in range(0, 1200, 100))
