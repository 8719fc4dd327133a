"""A pool of worker processes on one machine: one per GPU, or N on CPU cores.

Each member is a plain `surge worker` process in the same consumer group, so Kafka spreads
the partitions over them; with `gpus`, member i sees only the i-th visible GPU
(`CUDA_VISIBLE_DEVICES`), so "cuda:0" in every model config means its own device; with N
members, member i runs on the i-th of N shares of the pool's CPUs, so that a runtime sizing
its threads to the CPUs it sees does not have N members each take every core. The pool
restarts a member that dies (with back-off), forwards SIGTERM/SIGINT so every member drains
and commits, and exits once all have stopped. A member that keeps dying (8 times within 10
minutes) stops the whole pool, with status 1: its supervisor (Kubernetes, systemd) sees the
failure, where endless restarts in here would hide it and rebalance the group each time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import structlog

from surge.config import Settings
from surge.workers.worker import SHUTDOWN_BEYOND_DRAIN_S

log = structlog.get_logger("surge.pool")

_POLL_S = 0.2
_RESTART_FIRST_S = 1.0
_RESTART_MAX_S = 30.0
_STABLE_S = 60.0  # a member up this long restarts after a crash without back-off
_KILL_MARGIN_S = 10.0  # past a member's own bounds on its shutdown
_GIVE_UP_FAILURES = 8  # backing off 1 + 2 + … + 30 s: 91 s of retries before giving up
_GIVE_UP_WINDOW_S = 600.0


class _Member:
    def __init__(
        self, index: int, argv: list[str], env: dict[str, str], cpus: set[int] | None = None
    ) -> None:
        self.index, self._argv, self._env, self._cpus = index, argv, env, cpus
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.backoff = _RESTART_FIRST_S
        self.restart_at = 0.0
        self._exits: deque[float] = deque(maxlen=_GIVE_UP_FAILURES)

    def exited(self, now: float) -> bool:
        """Note that it stopped on its own at `now`; whether it has done so too often."""
        self._exits.append(now)
        return len(self._exits) == _GIVE_UP_FAILURES and now - self._exits[0] <= _GIVE_UP_WINDOW_S

    def start(self) -> None:
        pool = {"SURGE_POOL_PID": str(os.getpid())}  # a member outliving the pool stops
        cpus = self._cpus
        # Set in the child before it runs: every thread it starts inherits the share.
        pin = None if cpus is None else lambda: os.sched_setaffinity(0, cpus)
        self.process = subprocess.Popen(
            self._argv, env=os.environ | self._env | pool, preexec_fn=pin
        )
        self.started = time.monotonic()
        shown = {} if cpus is None else {"cpus": sorted(cpus)}
        log.info(
            "pool_member_started", member=self.index, pid=self.process.pid, **self._env, **shown
        )


def member_devices(processes: str) -> list[dict[str, str]]:
    """One environment per member, with its GPU: a member per visible GPU for "gpus" (one,
    on the CPU, where none is visible), else `processes` members."""
    if processes != "gpus":
        return [{} for _ in range(int(processes))]
    from surge.workers.runtimes.devices import cuda_device_count

    # As many as the driver sees: of a CUDA_VISIBLE_DEVICES list, the first that many (it
    # stops at the first entry that names no GPU), none on a machine without one.
    count = cuda_device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",")[:count] if visible else [str(i) for i in range(count)]
    return [{"CUDA_VISIBLE_DEVICES": device.strip()} for device in devices] or [{}]


def member_cpus(count: int) -> list[set[int]]:
    """The pool's CPUs in `count` contiguous shares (one each, round the CPUs, if fewer)."""
    cpus = sorted(os.sched_getaffinity(0))
    if count >= len(cpus):
        return [{cpus[i % len(cpus)]} for i in range(count)]
    size, extra = divmod(len(cpus), count)
    shares, start = [], 0
    for i in range(count):
        end = start + size + (i < extra)
        shares.append(set(cpus[start:end]))
        start = end
    return shares


def member_envs(settings: Settings, processes: str) -> list[dict[str, str]]:
    """The environment of each member: its GPU, and its own metrics port."""
    envs = member_devices(processes)
    if processes == "gpus" and "CUDA_VISIBLE_DEVICES" not in envs[0]:
        log.warning("pool_no_gpu", note="no GPU visible: one member, on the CPU")
    port = settings.metrics.port
    if port and port + len(envs) - 1 > 65535:
        raise ValueError(
            f"metrics.port {port}: {len(envs)} members need ports up to {port + len(envs) - 1}"
        )
    for index, env in enumerate(envs):
        env["SURGE_POOL_MEMBER"] = str(index)
        if port:
            env["SURGE_METRICS__PORT"] = str(port + index)
    return envs


def run_pool(settings: Settings, processes: str, config: Path | None) -> int:
    argv = [sys.executable, "-m", "surge", "worker"]
    if config is not None:
        argv += ["--config", str(config)]
    try:
        envs = member_envs(settings, processes)
    except ValueError as exc:  # a setting the user can fix: one line, as for any other
        print(exc, file=sys.stderr)
        return 2
    # CPU members share the CPUs; GPU members each drive their own device.
    shares: list[set[int] | None] = (
        [None] * len(envs) if processes == "gpus" else list(member_cpus(len(envs)))
    )
    members = [
        _Member(i, argv, env, cpus) for i, (env, cpus) in enumerate(zip(envs, shares, strict=True))
    ]
    stopping = gave_up = False
    signalled: set[int] = set()  # pids told to stop

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        _terminate(members, signalled)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for member in members:
            if stopping:  # told to stop while starting them: start no more
                break
            member.start()
        while not stopping:
            time.sleep(_POLL_S)
            for member in members:
                if stopping:
                    break
                if _supervise(member):
                    log.error("pool_gave_up", member=member.index, exits=_GIVE_UP_FAILURES)
                    stopping = gave_up = True
    except (OSError, subprocess.SubprocessError) as exc:
        # A member could not be started (no memory or processes left to fork, its CPUs
        # gone from the pool's): the others drain and stop as on SIGTERM, supervised.
        log.error("pool_member_start_failed", error=repr(exc))
        stopping = gave_up = True
    _terminate(members, signalled)  # a member restarted as the signal came in
    # A member's own shutdown is bounded by this (each step within its limit); past it,
    # something in it hangs and only SIGKILL ends it.
    bound = settings.worker.shutdown_timeout_s + SHUTDOWN_BEYOND_DRAIN_S + _KILL_MARGIN_S
    deadline = time.monotonic() + bound
    codes = [_stopped(member, deadline) for member in members if member.process is not None]
    log.info("pool_stopped", exit_codes=codes)
    # Stopped as asked: by its own shutdown, or by the signal itself (SIGTERM, or a terminal's
    # Ctrl-C, which reaches members too) before it could set up its handler. A member that had
    # died before (waiting to restart) was already reported.
    stopped = (0, -signal.SIGTERM, -signal.SIGINT, None)
    return 0 if not gave_up and all(code in stopped for code in codes) else 1


def _stopped(member: _Member, deadline: float) -> int | None:
    """The exit status of a member told to stop; None if it was not running by then."""
    process = member.process
    assert process is not None
    if member.restart_at:
        return None
    try:
        return process.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        log.error("pool_member_killed", member=member.index, pid=process.pid)
        process.kill()
        process.wait()
        return -signal.SIGKILL


def _terminate(members: list[_Member], signalled: set[int]) -> None:
    for member in members:
        process = member.process
        if process is not None and process.pid not in signalled and process.poll() is None:
            signalled.add(process.pid)
            process.send_signal(signal.SIGTERM)


def _supervise(member: _Member) -> bool:
    """Restart a member that stopped on its own, backing off while it keeps failing; True
    when it has stopped too often to try again."""
    assert member.process is not None
    now = time.monotonic()
    if member.restart_at:
        if now >= member.restart_at:
            member.restart_at = 0.0
            member.start()
        return False
    code = member.process.poll()
    if code is None:
        return False
    if member.exited(now):
        log.error("pool_member_exited", member=member.index, code=code)
        return True
    if now - member.started > _STABLE_S:
        member.backoff = _RESTART_FIRST_S
    log.error("pool_member_exited", member=member.index, code=code, restart_in=member.backoff)
    member.restart_at = now + member.backoff
    member.backoff = min(member.backoff * 2, _RESTART_MAX_S)
    return False
