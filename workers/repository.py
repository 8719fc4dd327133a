"""The model repository: `MODEL_ROOT/<name>/<version>/model.{onnx,pt2,pt}` plus an optional
`MODEL_ROOT/<name>/config.toml`.

A scan yields the desired set of versions; `reconcile()` loads what is new (warmed up before it
takes traffic) and drains what is gone. Hot reload is scanning again, nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import structlog

from surge.config import ConfigError, ModelConfig, convert, read_toml
from surge.schemas import ErrorCode
from surge.workers import metrics, runtimes
from surge.workers.batcher import Batcher
from surge.workers.intake import Intake
from surge.workers.replies import Replies
from surge.workers.tickets import Rejection

log = structlog.get_logger("surge.repository")
# Lengths of variable dimensions a warm-up tries, shortest first.
_WARM_LENGTHS = (1, 32, 256)

T = TypeVar("T")

# A file younger than this may still be being written: wait for the next scan.
SETTLE_S = 1.0
# A version that failed to load is tried again when its files change, or after this long (a
# cause outside its files, such as a GPU short of memory, may have passed).
RETRY_FAILED_S = 60.0
# A scan still running after this long is said once: a hung network mount holds hot reload
# (the models loaded keep serving) and, unnoticed, would leave an operator guessing.
SCAN_SLOW_S = 30.0


@dataclass(frozen=True, slots=True)
class VersionSource:
    name: str
    version: int
    artifact: Path
    # The version's files (bytes in all, newest mtime) and the config's mtime: a change reloads.
    stamp: tuple[int, int, int]
    config: ModelConfig


@dataclass(slots=True, eq=False)
class ServedVersion:
    source: VersionSource
    runtime: runtimes.Runtime
    intake: Intake
    batcher: Batcher
    executor: ThreadPoolExecutor

    @property
    def config(self) -> ModelConfig:
        return self.source.config


@dataclass(slots=True)
class Scan:
    wanted: dict[tuple[str, int], VersionSource] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    # Models that could not be scanned, or whose config is still being written: each keeps
    # what it serves.
    unreadable: set[str] = field(default_factory=set)
    settling: set[tuple[str, int]] = field(default_factory=set)  # files still being written
    root_missing: bool = False  # the scan saw nothing: every model keeps what it serves
    # Under the latest policy, each model's other versions, newest first: what serves while
    # none of the wanted ones loads.
    older: dict[str, list[VersionSource]] = field(default_factory=dict)


def scan(root: Path, names: Collection[str] = (), settle_s: float = SETTLE_S) -> Scan:
    """The versions the version policies ask for, among files older than `settle_s` (a
    younger one may still be being copied in). A model directory that cannot be read (its
    config invalid, a directory the worker may not list, a version removed mid-scan) is a
    problem of that model alone: the others are scanned, and it keeps what it serves."""
    result = Scan()
    if not root.is_dir():
        # Unmounted, or swapped for another just now: not a reason to unload every model.
        result.problems.append(f"model root {root} is not a directory")
        result.root_missing = True
        return result
    now_ns = time.time_ns()
    try:
        model_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError as exc:  # no right to list it, a stale network mount: as if missing
        result.problems.append(f"cannot read model root {root}: {exc.strerror or exc}")
        result.root_missing = True
        return result
    for model_dir in model_dirs:
        name = model_dir.name
        if names and name not in names:
            continue
        try:
            _scan_model(model_dir, now_ns, settle_s, result)
            continue
        except ConfigError as exc:
            problem = str(exc)
        except OSError as exc:
            problem = f"cannot read {exc.filename or model_dir}: {exc.strerror or exc}"
        result.problems.append(problem)
        result.unreadable.add(name)
    return result


def _scan_model(model_dir: Path, now_ns: int, settle_s: float, result: Scan) -> None:
    name = model_dir.name
    config_path = model_dir / "config.toml"
    config_stamp = 0
    config = ModelConfig()
    if config_path.is_file() or config_path.is_symlink():  # a broken link: unreadable
        config_stamp = config_path.stat().st_mtime_ns
        if now_ns - config_stamp < settle_s * 1e9:
            # Cut short mid-write, a config can still parse (empty, say) and reload every
            # version with other settings: wait for the next scan.
            result.unreadable.add(name)
            return
        config = convert(read_toml(config_path), ModelConfig, str(config_path))
    found: dict[int, VersionSource] = {}
    settling: set[int] = set()  # versions whose files are still being written
    for version_dir in model_dir.iterdir():
        artifact = runtimes.find_artifact(version_dir, config.runtime)
        version = _version_number(version_dir.name)
        if artifact is None:
            # Its model file not there yet (weights copied first, a download under another
            # name) but written to lately: a version arriving, or being replaced.
            if version is not None and _written_lately(version_dir, now_ns, settle_s):
                settling.add(version)
            continue
        if version is None:
            result.problems.append(
                f"{version_dir}: a version directory is named by a number, without leading zeros"
            )
            continue
        size, newest = _files_stamp(version_dir)
        if now_ns - newest < settle_s * 1e9:  # external weights too, not only the model file
            settling.add(version)
            continue
        stamp = (size, newest, config_stamp)
        found[version] = VersionSource(name, version, artifact, stamp, config)
    # Chosen among the versions still being written too: a newest version copied over in
    # place is not a reason to load the one before it meanwhile.
    result.settling |= {(name, version) for version in settling}
    wanted = [v for v in _apply_policy(config, sorted({*found, *settling})) if v in found]
    for version in wanted:
        result.wanted[(name, version)] = found[version]
    if config.version_policy == "latest":
        result.older[name] = [found[v] for v in sorted(found, reverse=True) if v not in wanted]


def _version_number(name: str) -> int | None:
    """A version directory's number: ASCII digits written the one way (`02` would be 2 too,
    and `str.isdigit` takes `²`, which `int` refuses)."""
    if not (name.isascii() and name.isdigit()) or str(int(name)) != name:
        return None
    return int(name)


def _written_lately(version_dir: Path, now_ns: int, settle_s: float) -> bool:
    """Whether a directory, or a file under it, changed within `settle_s`."""
    return version_dir.is_dir() and now_ns - _files_stamp(version_dir)[1] < settle_s * 1e9


def _files_stamp(version_dir: Path) -> tuple[int, int]:
    """The bytes of every file under a version directory, and the newest mtime among them
    (and the directory's own: a file removed changes it)."""
    size, newest = 0, version_dir.stat().st_mtime_ns
    for path in version_dir.rglob("*"):
        if path.is_symlink() and not path.exists():
            continue  # a link to nothing: no part of the model, and nothing to wait for
        stat = path.stat()
        newest = max(newest, stat.st_mtime_ns)
        if path.is_file():
            size += stat.st_size
    return size, newest


def _apply_policy(config: ModelConfig, versions: list[int]) -> list[int]:
    if config.version_policy == "all":
        return versions
    if config.version_policy == "specific":
        return [v for v in versions if v in config.versions]
    return versions[-config.latest_versions :]


class ModelRepository:
    def __init__(
        self,
        root: Path,
        names: Collection[str],
        replies: Replies,
        *,
        time_budget_s: float,
        max_tensor_elements: int,
        on_crash: Callable[[BaseException], None] = lambda exc: None,
        load_timeout_s: float = 300.0,
    ) -> None:
        self.root = root
        self._max_elements = max_tensor_elements
        self._on_crash = on_crash
        self._names = frozenset(names)
        self._replies = replies
        self._budget = time_budget_s
        self._load_timeout_s = load_timeout_s
        # Loads and warm-ups run here; those that outlived load_timeout_s are kept in `_stuck`
        # until their thread returns (one that never does keeps the process from exiting).
        self._loader = ThreadPoolExecutor(thread_name_prefix="model-load")
        self._stuck: set[Future[Any]] = set()
        # Scans run one at a time on a thread of their own: a stat on a hung mount never
        # returns, and that thread must not be one that asyncio waits for at exit.
        self._scanner = ThreadPoolExecutor(1, thread_name_prefix="model-scan")
        self._scanning: Future[Scan] | None = None
        self._served: dict[tuple[str, int], ServedVersion] = {}
        # Requests of unloaded versions that will never be answered (their device failed):
        # left uncommitted, for the partition's next owner.
        self.abandoned = 0
        self._latest: dict[str, ServedVersion] = {}
        # Versions that failed to load: their stamp then, and when.
        self._failed: dict[tuple[str, int], tuple[tuple[int, int, int], float]] = {}
        self._draining: set[asyncio.Task[None]] = set()
        self._retiring: set[ServedVersion] = set()  # until unloaded
        # Unloaded, with a call still running on one of their threads (past its budget).
        self._lingering: set[Batcher] = set()
        self._problems: set[str] = set()
        self._queued_models: set[str] = set()  # those with a surge_queued_seconds sample

    # -- the hot path ---------------------------------------------------------------------

    def resolve(self, model: str, version: str | None) -> ServedVersion | Rejection:
        if version is None:
            served = self._latest.get(model)
            if served is None:
                return Rejection(ErrorCode.UNKNOWN_MODEL, f"model {model!r} is not served here")
            return served
        # As directories are named: int() would take "1_0" as 10, " 3" and "+3" as 3.
        number = _version_number(version)
        served = None if number is None else self._served.get((model, number))
        if served is None:
            if model not in self._latest:
                return Rejection(ErrorCode.UNKNOWN_MODEL, f"model {model!r} is not served here")
            return Rejection(
                ErrorCode.UNKNOWN_VERSION, f"model {model!r} has no version {version!r}"
            )
        return served

    # -- reconciliation -------------------------------------------------------------------

    def model_names(self) -> list[str]:
        """The models with a version serving: the worker consumes their topics only."""
        return sorted(self._latest)

    @property
    def served(self) -> dict[tuple[str, int], ServedVersion]:
        return dict(self._served)

    def ahead(
        self, limit_s: float, paused: Collection[str], resume_s: float | None = None
    ) -> set[str]:
        """The models every version of which has queued enough to stop fetching for it
        (`Batcher.ahead`; `paused`: the models stopped so far). Each model's queued time goes
        to the metrics on the way."""
        queued: dict[str, float] = {}
        short: set[str] = set()  # a version short of work keeps its model's topic flowing
        for (name, _), served in self._served.items():
            batcher = served.batcher
            queued[name] = queued.get(name, 0.0) + batcher.queued_s
            if not batcher.ahead(limit_s, paused=name in paused, resume_s=resume_s):
                short.add(name)
        for name, seconds in queued.items():
            metrics.QUEUED_SECONDS.labels(name).set(seconds)
        self._queued_models |= queued.keys()
        return set(queued) - short

    async def reconcile(self, *, settle_s: float = SETTLE_S) -> None:
        """Load new versions, retire removed ones. At start-up pass settle_s=0: files present
        before the worker started are complete.

        A version keeps serving while its files are being edited (config being rewritten,
        model file being copied over), and while the version meant to replace it fails to load.
        A model none of whose wanted versions loads, and none of whose versions serves yet (at
        start-up, say), is served by its newest older version that loads.
        """
        found = await self._scan(settle_s)
        for problem in set(found.problems) - self._problems:  # say it once, not every scan
            log.error("model_config_invalid", problem=problem)
        self._problems = set(found.problems)
        for key, source in found.wanted.items():
            current = self._served.get(key)
            if current is not None and current.source.stamp == source.stamp:
                continue
            served = await self._load_once(source)
            if served is None:
                continue
            self._served[key] = served
            self._update_routes()
            if current is not None:
                self._retire(current)
        for name, older in found.older.items():
            if name not in self._latest:
                await self._load_older(older)
        serving = {name for name, version in found.wanted if (name, version) in self._served}
        listed = {name for name, _ in found.wanted}
        arriving = {name for name, _ in found.settling}
        gone = [
            (name, version)
            for name, version in self._served
            if not found.root_missing
            and (name, version) not in found.wanted
            and name not in found.unreadable
            and (name, version) not in found.settling
            # an old version goes once a wanted one serves, or when the model is gone (and
            # no version of it is still being copied in)
            and (name in serving or (name not in listed and name not in arriving))
        ]
        retired = [self._served.pop(key) for key in gone]
        self._update_routes()
        for served in retired:
            self._retire(served)
        for name in self._queued_models - self._latest.keys():  # no longer served
            metrics.QUEUED_SECONDS.remove(name)
        self._queued_models &= self._latest.keys()

    async def _load_older(self, older: list[VersionSource]) -> None:
        for source in older:
            served = await self._load_once(source)
            if served is not None:
                log.warning(
                    "model_serving_older_version", model=source.name, version=source.version
                )
                self._served[(source.name, source.version)] = served
                self._update_routes()
                return

    async def _load_once(self, source: VersionSource) -> ServedVersion | None:
        """`_load`, unless these very files failed before: tried again once they change."""
        key = (source.name, source.version)
        failed = self._failed.get(key)
        if failed is not None:
            stamp, when = failed
            if stamp == source.stamp and time.monotonic() - when < RETRY_FAILED_S:
                return None
        served = await self._load(source)
        if served is None:
            self._failed[key] = (source.stamp, time.monotonic())
        else:
            self._failed.pop(key, None)
        return served

    async def _scan(self, settle_s: float) -> Scan:
        """`scan()` off the event loop; one that takes longer than SCAN_SLOW_S is logged, and
        waited for. A caller cancelled meanwhile leaves its thread running (`scans_running`)."""
        self._scanning = self._scanner.submit(scan, self.root, self._names, settle_s)
        found = asyncio.wrap_future(self._scanning)
        began = time.monotonic()
        if not (await asyncio.wait([found], timeout=SCAN_SLOW_S))[0]:
            log.error("model_scan_slow", root=str(self.root), waited_s=SCAN_SLOW_S)
            await found
            log.info("model_scan_done", root=str(self.root), took_s=time.monotonic() - began)
        return found.result()

    def _update_routes(self) -> None:
        """Point each model at its highest served version. Called before any retirement, so
        a retiring batcher never receives another request."""
        latest: dict[str, ServedVersion] = {}
        for (name, _), served in sorted(self._served.items()):
            latest[name] = served
        self._latest = latest

    async def _load(self, source: VersionSource) -> ServedVersion | None:
        log.info(
            "model_loading", model=source.name, version=source.version, path=str(source.artifact)
        )
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._load_timeout_s):
                runtime = await self._loaded(source)
        except TimeoutError:
            log.error(
                "model_load_failed",
                model=source.name,
                version=source.version,
                error=f"not loaded and warmed up within {self._load_timeout_s:g}s",
            )
            return None
        except runtimes.DeviceFailed as exc:
            # The process's CUDA context is unusable now, for every model: a new process.
            log.error("device_failed", model=source.name, version=source.version, error=str(exc))
            self._on_crash(exc)
            return None
        except Exception as exc:  # a bad model file must not take the worker down
            log.error(
                "model_load_failed", model=source.name, version=source.version, error=repr(exc)
            )
            return None
        executor = ThreadPoolExecutor(
            max_workers=source.config.instances,
            thread_name_prefix=f"{source.name}-{source.version}",
        )
        batcher = Batcher(
            model=source.name,
            version=str(source.version),
            runtime=runtime,
            config=source.config,
            executor=executor,
            replies=self._replies,
            time_budget_s=self._budget,
            max_elements=self._max_elements,
        )
        batcher.start(self._on_crash)
        log.info(
            "model_ready",
            model=source.name,
            version=source.version,
            runtime=runtime.kind,
            device=runtime.device,
            seconds=round(time.perf_counter() - started, 3),
        )
        intake = Intake(
            runtime.inputs,
            runtime.outputs,
            max_rows=source.config.max_batch_size,
            max_elements=self._max_elements,
        )
        return ServedVersion(source, runtime, intake, batcher, executor)

    async def _loaded(self, source: VersionSource) -> runtimes.Runtime:
        """The version's runtime, warmed up: one that fails its warm-up, or is cut off by the
        load timeout, is closed (its memory, a GPU's, goes back) once no loader uses it."""
        runtime = await self._off_loop(
            runtimes.load, source.artifact, source.config, close_late=True
        )
        try:
            if source.config.warmup:
                await self._warm_up(source, runtime)
        except BaseException:
            # After the warm-up calls cut short by the timeout, which may still be using it.
            with contextlib.suppress(RuntimeError):  # the loader shut down: left to the GC
                self._loader.submit(_close_after, list(self._stuck), runtime)
            raise
        return runtime

    async def _warm_up(self, source: VersionSource, runtime: runtimes.Runtime) -> None:
        """Warm the batch sizes it will see. Failing at one row means a broken model, and at
        two one that runs a row at a time (its batch dimension fixed inside the graph): every
        batch would be split down to single requests. Failing larger (out of memory, say)
        only means those batches will be split when they come, unless its outputs proved
        not batch-first (a variable dimension of 1 hides that at one row) or unlike those
        declared."""
        config = source.config
        sizes = {*config.preferred_batch_sizes, config.max_batch_size}
        if config.max_batch_size > 1:
            sizes.add(2)
        length = await self._warm_one_row(runtime)
        for size in sorted(sizes - {1}):
            try:
                await self._off_loop(runtimes.warm_up, runtime, [size], length)
            except (runtimes.DeviceFailed, runtimes.NotBatchFirst, runtimes.OutputsUnlikeDeclared):
                raise
            except Exception as exc:
                if size == 2:
                    raise ValueError(
                        f"the model runs one row but not two ({exc!r:.300}): export it with a "
                        "dynamic batch dimension (or set max_batch_size = 1 in its config.toml)"
                    ) from exc
                log.warning("warmup_failed", model=source.name, rows=size, error=repr(exc)[:300])
                return

    async def _warm_one_row(self, runtime: runtimes.Runtime) -> int:
        """Warm one row, and say the length of variable dimensions it ran at: 1 where the
        model takes it; a model that cannot run so short (a convolution without padding, a
        minimum window) is tried longer, and fails its load only if it runs at no length
        tried."""
        if not runtimes.varies(runtime):
            await self._off_loop(runtimes.warm_up, runtime, [1])
            return 1
        error: Exception | None = None
        for length in _WARM_LENGTHS:
            try:
                await self._off_loop(runtimes.warm_up, runtime, [1], length)
                return length
            except (runtimes.DeviceFailed, runtimes.NotBatchFirst, runtimes.OutputsUnlikeDeclared):
                raise
            except Exception as exc:
                error = exc
        tried = ", ".join(map(str, _WARM_LENGTHS))
        raise ValueError(f"the model runs one row at no length tried ({tried}): {error!r:.300}")

    async def _off_loop(self, call: Callable[..., T], *args: Any, close_late: bool = False) -> T:
        """`call(*args)` on a loader thread; one cut short by the load timeout is kept in
        `_stuck` while it runs on, and the runtime it returns closed if `close_late`."""
        future = self._loader.submit(call, *args)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if not future.done():
                self._stuck.add(future)
                future.add_done_callback(self._stuck.discard)
                if close_late:
                    future.add_done_callback(_close_result)
            raise

    def _retire(self, served: ServedVersion) -> None:
        """Stop routing to it now; unload once its queued and running batches finish."""
        task = asyncio.create_task(self._drain(served))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def _drain(self, served: ServedVersion) -> None:
        self._retiring.add(served)
        await served.batcher.close()
        self.abandoned += served.batcher.abandoned
        served.executor.shutdown(wait=False)
        await asyncio.to_thread(served.runtime.close)
        self._retiring.discard(served)
        if served.batcher.calls_running:
            self._lingering.add(served.batcher)
        log.info("model_unloaded", model=served.source.name, version=served.source.version)

    @property
    def calls_running(self) -> int:
        """Model calls on executor threads that have not returned, over every version loaded
        or unloaded with one still running (one that outlived a shutdown hung: it would keep
        the process from exiting)."""
        self._lingering = {batcher for batcher in self._lingering if batcher.calls_running}
        loaded = [served.batcher for served in (*self._served.values(), *self._retiring)]
        return sum(batcher.calls_running for batcher in (*loaded, *self._lingering))

    @property
    def loads_running(self) -> int:
        """Loads and warm-ups cut short (past their timeout, or by a stop) whose threads run
        on: they too would keep the process from exiting, though nothing hung."""
        return len(self._stuck)

    @property
    def scans_running(self) -> int:
        """A scan whose caller was cancelled (by a stop) while its thread, stuck on the file
        system, runs on: it too would keep the process from exiting."""
        return int(self._scanning is not None and not self._scanning.done())

    async def close(self) -> None:
        """Drain every served version (on shutdown)."""
        retired = list(self._served.values())
        self._served.clear()
        self._update_routes()
        for served in retired:
            self._retire(served)
        await asyncio.gather(*self._draining)
        self._loader.shutdown(wait=False)
        self._scanner.shutdown(wait=False)


def _close_after(calls: list[Future[Any]], runtime: runtimes.Runtime) -> None:
    """Close a runtime that will serve nothing once these calls (which may use it) end."""
    wait(calls)
    _close(runtime)


def _close_result(future: Future[Any]) -> None:
    if not future.cancelled() and future.exception() is None:
        _close(future.result())


def _close(runtime: runtimes.Runtime) -> None:
    try:
        runtime.close()
    except Exception as exc:  # nothing to serve either way: said, not raised
        log.warning("model_close_failed", error=repr(exc))
