"""Shared benchmark plumbing: services, a worker process, its batch and latency histograms."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from surge.pool import member_devices
from surge.producers import SurgeClient
from surge.workers.runtimes.onnx_runtime import load_cuda_libraries
from tests.services import KAFKA_GC, KafkaBroker, free_port

OUT = Path(__file__).parent / "out"
console = Console()


def scratch_dir(prefix: str) -> Path:
    """A temporary folder removed when the benchmark exits: the models one run writes take
    up to hundreds of MB."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def broker_name(bootstrap: str | None) -> str:
    """What a benchmark's tables say it ran against."""
    return f"the cluster at {bootstrap}" if bootstrap else "Apache Kafka"


@contextmanager
def kafka_broker(bootstrap: str | None) -> Iterator[str]:
    """An existing cluster, or a fresh single-node Apache Kafka on loopback with the JVM
    options of Kafka's own start script; its GC pauses are printed at the end, since they
    show in every latency tail measured through it."""
    if bootstrap:
        yield bootstrap
        return
    broker = KafkaBroker(heap="1g", gc=KAFKA_GC).start()
    try:
        assert broker.process is not None
        seconds = asyncio.run(_warm_up(broker.bootstrap, broker.process.pid))
        console.print(f"broker warmed up in {seconds:.0f} s (its JIT compilers went quiet)")
        yield broker.bootstrap
    finally:
        broker.stop()
        pauses = gc_pauses_ms(broker.workdir / "gc.log")
        if pauses:
            console.print(
                f"broker GC: {len(pauses)} pauses, longest {max(pauses):.1f} ms, "
                f"{sum(pauses):.0f} ms in all"
            )
        broker.close()


async def _warm_up(bootstrap: str, pid: int, *, max_s: float = 180.0) -> float:
    """Produce and consume (in a group, committing) until the broker's JIT compilers spend
    under 5% of a core for 6 s: a fresh JVM compiles for a minute or more under load, on the
    same cores as everything measured after it. Seconds taken."""
    topic = f"bench.warm-up.{time.time_ns()}"
    started = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        stack.push_async_callback(admin.close)
        await admin.create_topics([NewTopic(topic, 8, 1)])
        stack.push_async_callback(admin.delete_topics, [topic])
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, acks="all", enable_idempotence=True
        )
        await producer.start()
        stack.push_async_callback(producer.stop)
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, group_id=topic, auto_offset_reset="earliest"
        )
        await consumer.start()
        stack.push_async_callback(consumer.stop)
        value, headers = bytes(200), [("content-type", b"application/msgpack")] * 3
        quiet = 0  # consecutive windows
        while quiet < 3 and time.monotonic() - started < max_s:
            compiled, window = _jit_threads(pid), time.monotonic()
            while time.monotonic() - window < 2.0:
                for partition in range(8):
                    batch, i = producer.create_batch(), 0
                    while batch.append(key=b"%d" % i, value=value, timestamp=None, headers=headers):
                        i += 1  # until the batch is full
                    await producer.send_batch(batch, topic, partition=partition)
                await consumer.getmany(timeout_ms=5)
                await consumer.commit()
            now = _jit_threads(pid)
            # Per thread: a compiler thread the JVM retired takes its time with it.
            spent = sum(max(0.0, cpu - compiled.get(tid, 0.0)) for tid, cpu in now.items())
            quiet = quiet + 1 if spent / (time.monotonic() - window) < 0.05 else 0
    return time.monotonic() - started


def _jit_threads(pid: int) -> dict[str, float]:
    """CPU seconds so far of each of a JVM's compiler threads, by thread id."""
    return {
        tid: ran
        for tid, (name, ran, _) in _threads(pid).items()
        if name.startswith(("C1 Compiler", "C2 Compiler"))
    }


def listener_pid(bootstrap: str) -> int | None:
    """The process on this machine listening on the first bootstrap server's port, if any."""
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    addresses = {"0.0.0.0", "::", *(("127.0.0.1", "::1") if host == "localhost" else (host,))}
    for connection in psutil.net_connections(kind="tcp"):
        if (
            connection.status == psutil.CONN_LISTEN
            and connection.laddr.port == int(port)
            and connection.laddr.ip.removeprefix("::ffff:") in addresses  # a JVM's IPv4 too
        ):
            return connection.pid
    return None


def scheduling(pid: int) -> tuple[float, float]:
    """Seconds a process's threads have run, and waited runnable for a CPU, so far. The wait
    is what a busy machine adds to every latency."""
    threads = _threads(pid).values()
    return sum(ran for _, ran, _ in threads), sum(waited for _, _, waited in threads)


def _threads(pid: int) -> dict[str, tuple[str, float, float]]:
    """Per thread id of a process: its name, and the seconds it has run and waited runnable
    for a CPU so far (Linux schedstat; no threads where /proc has none)."""
    found = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            name = (task / "comm").read_text().strip()
            ran, waited = (task / "schedstat").read_text().split()[:2]
        except OSError:  # the thread ended
            continue
        found[task.name] = (name, int(ran) / 1e9, int(waited) / 1e9)
    return found


def gc_pauses_ms(log: Path) -> list[float]:
    """Stop-the-world pauses in a JVM's `-Xlog:gc` log, in ms."""
    return [ms for _, ms in gc_pauses(log)]


def gc_pauses(log: Path) -> list[tuple[float, float]]:
    """(seconds since the JVM started, ms) of each stop-the-world pause in its `-Xlog:gc` log."""
    if not log.exists():
        return []
    text = log.read_text(errors="replace")
    return [(float(m[1]), float(m[2])) for m in _GC_PAUSE.finditer(text)]


_GC_PAUSE = re.compile(r"^\[(\d+(?:\.\d+)?)s\].*\bPause\b.* (\d+(?:\.\d+)?)ms$", re.MULTILINE)


class BrokerPauses:
    """A JVM broker's GC pauses by wall-clock time, from the `-Xlog:gc` file its command line
    names; none known for a broker without one, elsewhere, or not a JVM (noida-db)."""

    def __init__(self, pid: int | None) -> None:
        self._log: Path | None = None
        self._started = 0.0
        if pid is None:
            return
        process = psutil.Process(pid)
        for arg in process.cmdline():
            if arg.startswith("-Xlog:gc") and ":file=" in arg:
                self._log = Path(arg.split(":file=", 1)[1].split(":", 1)[0])
        self._started = process.create_time()  # the JVM's uptime counts from about here

    def between(self, start: float, end: float) -> list[float] | None:
        """Pauses (ms) that began between these `time.time()`s; None: not known."""
        if self._log is None:
            return None
        return [ms for up, ms in gc_pauses(self._log) if start <= self._started + up < end]


def providers(gpu: bool) -> list[str]:
    """ONNX Runtime providers for the model alone: CUDA first when asked for."""
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]


def ort_session(
    path: Path, options: ort.SessionOptions | None = None, *, gpu: bool = False
) -> ort.InferenceSession:
    """An ONNX Runtime session for the model alone, on the GPU when asked for: its CUDA
    libraries loaded as the worker loads them, and refused rather than timed on the CPU
    where onnxruntime could not use them (it falls back without a word)."""
    if gpu:
        load_cuda_libraries()
    session = ort.InferenceSession(str(path), options, providers=providers(gpu))
    if gpu and "CUDAExecutionProvider" not in session.get_providers():
        raise SystemExit(
            f"ONNX Runtime cannot use the GPU here (providers: {session.get_providers()}): "
            "install onnxruntime-gpu built for this CUDA"
        )
    return session


def rows_per_second(run: Callable[[], object], rows: int, passes: int = 3) -> float:
    """`run` (which handles `rows` rows) timed `passes` times: the median rows per second."""
    rates = []
    for _ in range(passes):
        started = time.perf_counter()
        run()
        rates.append(rows / (time.perf_counter() - started))
    return float(np.median(rates))


def batch_rows(batches: list[dict[str, np.ndarray]]) -> int:
    """Rows in all these batches (each input's first dimension)."""
    return sum(next(iter(b.values())).shape[0] for b in batches)


def free_ports(count: int) -> int:
    """The first of `count` consecutive loopback ports that are free now."""
    while True:
        first = free_port()
        if first + count - 1 > 65535:
            continue
        with contextlib.ExitStack() as held:
            try:
                for port in range(first + 1, first + count):
                    taken = held.enter_context(socket.socket())
                    taken.bind(("127.0.0.1", port))
            except OSError:
                continue
        return first


class WorkerProcess:
    def __init__(
        self, bootstrap: str, model_root: Path, *, processes: int | str = 1, **env: str
    ) -> None:
        self.bootstrap = bootstrap
        # A pool's members serve metrics on consecutive ports from this one (`surge.pool`):
        # batch and latency figures add up over all of them.
        self.members = len(member_devices(str(processes)))
        self.metrics_port = free_ports(self.members)
        self.log = Path(tempfile.mkstemp(prefix="surge-bench-worker-", suffix=".log")[1])
        self.process = subprocess.Popen(
            [sys.executable, "-m", "surge", "worker", "--processes", str(processes)],
            env=os.environ
            | {
                "SURGE_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
                "SURGE_WORKER__MODEL_ROOT": str(model_root),
                "SURGE_WORKER__GROUP_ID": f"bench-{time.time_ns()}",
                "SURGE_METRICS__PORT": str(self.metrics_port),
                "SURGE_LOG__FORMAT": "json",
                **env,
            },
            stderr=self.log.open("wb"),
        )

    def first_result(
        self, model: str, inputs: Mapping[str, np.ndarray], timeout_s: float = 120.0
    ) -> None:
        """Wait for one request answered end to end (the model loaded and warmed up). A
        worker that exits first fails this at once, with the end of its log."""

        async def served() -> None:
            async with SurgeClient(self.bootstrap) as client:
                await client.predict(model, inputs, timeout=timeout_s)

        async def watched() -> None:
            answered = asyncio.ensure_future(served())
            try:
                while not answered.done():
                    if self.process.poll() is not None:
                        tail = self.log.read_text(errors="replace")[-3000:]
                        raise RuntimeError(
                            f"the worker exited ({self.process.returncode}); its log ends:\n{tail}"
                        )
                    await asyncio.wait({answered}, timeout=0.5)
                answered.result()
            finally:
                answered.cancel()
                await asyncio.gather(answered, return_exceptions=True)

        asyncio.run(watched())

    def batch_totals(self) -> dict[str, float]:
        """Model calls so far: their number, rows and seconds (from the worker's metrics)."""
        totals = {"batches": 0.0, "rows": 0.0, "seconds": 0.0}
        for family in self._metric_families():
            for sample in family.samples:
                if sample.name == "surge_batch_rows_count":
                    totals["batches"] += sample.value
                elif sample.name == "surge_batch_rows_sum":
                    totals["rows"] += sample.value
                elif sample.name == "surge_batch_seconds_sum":
                    totals["seconds"] += sample.value
        return totals

    def latency_buckets(self) -> dict[str, dict[float, float]]:
        """The worker's own latency histograms, cumulative counts by bucket bound (summed
        over topics and targets): `age` (record age at intake) and `outcome` (intake to a
        durable result)."""
        names = {
            "surge_record_age_seconds_bucket": "age",
            "surge_outcome_seconds_bucket": "outcome",
        }
        buckets: dict[str, dict[float, float]] = {"age": {}, "outcome": {}}
        for family in self._metric_families():
            for sample in family.samples:
                if sample.name in names:
                    counts = buckets[names[sample.name]]
                    bound = float(sample.labels["le"])
                    counts[bound] = counts.get(bound, 0.0) + sample.value
        return buckets

    def _metric_families(self) -> Iterator[Metric]:
        """Every member's metric families, one member after another."""
        for port in range(self.metrics_port, self.metrics_port + self.members):
            url = f"http://127.0.0.1:{port}/metrics"
            yield from text_string_to_metric_families(
                urllib.request.urlopen(url, timeout=5).read().decode()
            )

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)


def direct_throughput(
    model_path: Path, batch: int, threads: int, seconds: float = 2.0, *, gpu: bool = False
) -> float:
    """ONNX Runtime alone, no Kafka: rows per second at a given batch size (median of runs)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort_session(model_path, options, gpu=gpu)
    x = np.random.default_rng(0).standard_normal((batch, 32)).astype(np.float32)
    for _ in range(20):
        session.run(None, {"x": x})
    rates = []
    for _ in range(5):
        calls, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds / 5:
            session.run(None, {"x": x})
            calls += 1
        rates.append(calls * batch / elapsed)
    return float(np.median(rates))
