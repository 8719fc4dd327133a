"""The model repository keeps serving through bad deploys and half-written files."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from prometheus_client import REGISTRY

from surge.config import ConfigError, ModelConfig, convert
from surge.examples import write_mlp
from surge.schemas import ErrorCode
from surge.workers import ModelRepository, Rejection, runtimes, scan
from surge.workers import repository as repository_module
from surge.workers.intake import Job, admit
from tests.helpers import make_ticket
from tests.models import write_unpadded_conv


def _repository(root: Path) -> ModelRepository:
    return ModelRepository(
        root,
        [],
        replies=None,  # type: ignore[arg-type]
        time_budget_s=5,
        max_tensor_elements=1 << 22,
    )


def _served(repository: ModelRepository) -> list[tuple[str, int]]:
    return sorted(repository.served)


async def test_a_broken_new_version_leaves_the_old_one_serving(tmp_path: Path) -> None:
    write_mlp(tmp_path)
    repository = _repository(tmp_path)
    await repository.reconcile(settle_s=0)
    assert _served(repository) == [("mlp", 1)]

    (tmp_path / "mlp" / "2").mkdir()
    (tmp_path / "mlp" / "2" / "model.onnx").write_bytes(b"not a model")
    await repository.reconcile(settle_s=0)
    assert _served(repository) == [("mlp", 1)]
    assert not isinstance(repository.resolve("mlp", None), Rejection)

    write_mlp(tmp_path, 2, seed=3)  # fixed: now v2 replaces v1
    await repository.reconcile(settle_s=0)
    assert _served(repository) == [("mlp", 2)]
    await repository.close()


async def test_a_version_is_asked_for_as_its_directory_is_named(tmp_path: Path) -> None:
    write_mlp(tmp_path, 10)
    repository = _repository(tmp_path)
    await repository.reconcile(settle_s=0)
    try:
        resolved = repository.resolve("mlp", "10")
        assert not isinstance(resolved, Rejection)
        assert resolved.source.version == 10
        for asked in ("1_0", "+10", " 10", "010", "\u0661\u0660"):  # int() takes each as 10
            resolved = repository.resolve("mlp", asked)
            assert isinstance(resolved, Rejection), asked
            assert resolved.code == ErrorCode.UNKNOWN_VERSION
    finally:
        await repository.close()


async def test_a_broken_newest_version_at_start_up_leaves_the_one_before_serving(
    tmp_path: Path,
) -> None:
    write_mlp(tmp_path)
    (tmp_path / "mlp" / "2").mkdir()
    (tmp_path / "mlp" / "2" / "model.onnx").write_bytes(b"not a model")
    repository = _repository(tmp_path)  # a fresh worker: nothing served yet
    await repository.reconcile(settle_s=0)
    assert _served(repository) == [("mlp", 1)]
    await repository.reconcile(settle_s=0)  # neither tried again nor retired
    assert _served(repository) == [("mlp", 1)]

    write_mlp(tmp_path, 2, seed=3)  # fixed: now v2 replaces v1
    await repository.reconcile(settle_s=0)
    assert _served(repository) == [("mlp", 2)]
    await repository.close()


async def test_an_invalid_config_edit_keeps_the_model_serving(tmp_path: Path) -> None:
    write_mlp(tmp_path)
    repository = _repository(tmp_path)
    await repository.reconcile(settle_s=0)
    (tmp_path / "mlp" / "config.toml").write_text("max_batch_size = 'lots'\n")
    await repository.reconcile(settle_s=0)
    assert _served(repository) == [("mlp", 1)]

    (tmp_path / "mlp" / "config.toml").write_text("max_batch_size = 8\n")
    await repository.reconcile(settle_s=0)  # a config change reloads the version
    assert repository.served[("mlp", 1)].config.max_batch_size == 8
    await repository.close()


def test_a_model_directory_that_cannot_be_read_is_a_problem_of_that_model_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_mlp(tmp_path)
    shutil.copytree(tmp_path / "mlp", tmp_path / "latin1")
    (tmp_path / "latin1" / "config.toml").write_bytes(b"# caf\xe9\n")
    shutil.copytree(tmp_path / "mlp", tmp_path / "locked")
    find_artifact = runtimes.find_artifact

    def forbidden(version_dir: Path, runtime: str = "auto") -> Path | None:
        # As a directory the worker's user may not list (tests run as root, which may).
        if version_dir.parent.name == "locked":
            raise PermissionError(13, "Permission denied", str(version_dir))
        return find_artifact(version_dir, runtime)

    monkeypatch.setattr(runtimes, "find_artifact", forbidden)
    found = scan(tmp_path, settle_s=0)
    assert sorted(found.wanted) == [("mlp", 1)]
    assert found.unreadable == {"latin1", "locked"}
    problems = "\n".join(found.problems)
    assert "not UTF-8" in problems
    assert "Permission denied" in problems


async def test_files_still_being_written_wait_for_the_next_scan(tmp_path: Path) -> None:
    write_mlp(tmp_path)
    _age(tmp_path / "mlp" / "config.toml")
    found = scan(tmp_path, settle_s=60)
    assert found.wanted == {}
    assert found.settling == {("mlp", 1)}
    repository = _repository(tmp_path)
    await repository.reconcile(settle_s=60)
    assert _served(repository) == []
    await repository.reconcile(settle_s=0)
    assert _served(repository) == [("mlp", 1)]
    await repository.close()


async def test_removing_a_model_unloads_it(tmp_path: Path) -> None:
    write_mlp(tmp_path)
    repository = _repository(tmp_path)
    await repository.reconcile(settle_s=0)
    for path in sorted((tmp_path / "mlp").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (tmp_path / "mlp").rmdir()
    await repository.reconcile(settle_s=0)
    assert _served(repository) == []
    assert repository.resolve("mlp", None) == Rejection(
        ErrorCode.UNKNOWN_MODEL, "model 'mlp' is not served here"
    )
    await repository.close()


def test_scalar_and_mis_ranked_tensors_are_invalid_input(tmp_path: Path) -> None:
    from surge.workers.runtimes import TensorSpec

    body = b'{"inputs": [{"name": "x", "shape": [], "datatype": "FP32", "data": [1]}]}'
    ticket = make_ticket(body)
    for shape in ((), (4,)):
        result = admit(ticket, [TensorSpec("x", "FP32", shape)], [], max_rows=8, max_elements=99)
        assert isinstance(result, Rejection), shape
        assert result.code is ErrorCode.INVALID_INPUT
    good = b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}]}'
    ticket.value = good
    job = admit(ticket, [TensorSpec("x", "FP32", ())], [], max_rows=8, max_elements=99)
    assert isinstance(job, Job)
    np.testing.assert_array_equal(job.inputs["x"], [1, 2])


async def test_queued_time_is_reported_per_served_model_and_dropped_with_it(tmp_path: Path) -> None:
    def sample() -> float | None:
        return REGISTRY.get_sample_value("surge_queued_seconds", {"model": "mlp"})

    write_mlp(tmp_path)
    repository = _repository(tmp_path)
    await repository.reconcile(settle_s=0)
    assert repository.ahead(5.0, set()) == set()  # nothing queued
    assert sample() == 0.0
    (tmp_path / "mlp" / "1" / "model.onnx").unlink()
    await repository.reconcile(settle_s=0)
    assert repository.served == {}
    repository.ahead(5.0, set())
    assert sample() is None
    await repository.close()


def _age(path: Path, seconds: float = 120) -> None:
    """Make a file, or every file and directory under `path`, `seconds` old."""
    then = time.time() - seconds
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(item, (then, then))


async def test_a_model_root_gone_for_a_moment_unloads_nothing(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_mlp(root)
    repository = _repository(root)
    await repository.reconcile(settle_s=0)
    served = repository.served[("mlp", 1)]
    root.rename(tmp_path / "elsewhere")  # unmounted, or a symlink being swapped
    await repository.reconcile(settle_s=0)
    assert repository.served == {("mlp", 1): served}
    (tmp_path / "elsewhere").rename(root)
    await repository.reconcile(settle_s=0)
    assert repository.served == {("mlp", 1): served}  # not reloaded either
    await repository.close()


async def test_a_model_root_that_cannot_be_listed_unloads_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Permission taken away, or a network mount gone stale: said, not raised."""
    write_mlp(tmp_path)
    repository = _repository(tmp_path)
    await repository.reconcile(settle_s=0)
    served = repository.served[("mlp", 1)]
    iterdir = Path.iterdir

    def refuse(path: Path) -> Any:
        if path == tmp_path:
            raise PermissionError(13, "Permission denied", str(path))
        return iterdir(path)

    monkeypatch.setattr(Path, "iterdir", refuse)
    found = scan(tmp_path, settle_s=0)
    assert found.root_missing
    assert found.problems == [f"cannot read model root {tmp_path}: Permission denied"]
    await repository.reconcile(settle_s=0)
    assert repository.served == {("mlp", 1): served}
    await repository.close()


async def test_a_config_still_being_written_waits_for_the_next_scan(tmp_path: Path) -> None:
    write_mlp(tmp_path)
    _age(tmp_path / "mlp")
    repository = _repository(tmp_path)
    await repository.reconcile()
    served = repository.served[("mlp", 1)]
    config = tmp_path / "mlp" / "config.toml"
    config.write_text("")  # cut short mid-write: still valid TOML, every setting a default
    await repository.reconcile()
    assert repository.served == {("mlp", 1): served}
    assert served.config.max_batch_size != ModelConfig().max_batch_size
    _age(config)  # it stays that way: now it is what the operator wrote
    await repository.reconcile()
    assert repository.served[("mlp", 1)].config == ModelConfig()
    await repository.close()


def test_version_directories_are_named_by_plain_numbers(tmp_path: Path) -> None:
    write_mlp(tmp_path)
    for name in ("1²", "02"):  # `str.isdigit` takes the first, `int` the second (as 2)
        shutil.copytree(tmp_path / "mlp" / "1", tmp_path / "mlp" / name)
    found = scan(tmp_path, settle_s=0)
    assert sorted(found.wanted) == [("mlp", 1)]
    assert sum("named by a number" in problem for problem in found.problems) == 2


async def test_a_replacement_still_being_copied_in_keeps_the_old_version(tmp_path: Path) -> None:
    write_mlp(tmp_path)
    _age(tmp_path / "mlp")
    repository = _repository(tmp_path)
    await repository.reconcile()
    shutil.rmtree(tmp_path / "mlp" / "1")
    write_mlp(tmp_path, 2, seed=3)  # just written: still settling
    _age(tmp_path / "mlp" / "config.toml")
    await repository.reconcile()
    assert _served(repository) == [("mlp", 1)], "the model went unserved in between"
    _age(tmp_path / "mlp" / "2")
    await repository.reconcile()
    assert _served(repository) == [("mlp", 2)]
    await repository.close()


async def test_a_version_whose_model_file_is_being_replaced_keeps_serving(tmp_path: Path) -> None:
    """Weights copied in before the model file, or a download under a temporary name: for a
    moment the version has no model file, and it is being written to, not removed."""
    write_mlp(tmp_path)
    _age(tmp_path / "mlp")
    repository = _repository(tmp_path)
    await repository.reconcile()
    version = tmp_path / "mlp" / "1"
    model = (version / "model.onnx").read_bytes()
    (version / "model.onnx").unlink()
    (version / "model.onnx.part").write_bytes(model[:100])
    await repository.reconcile()
    assert _served(repository) == [("mlp", 1)], "unloaded while its file was being replaced"
    (version / "model.onnx.part").rename(version / "model.onnx")
    (version / "model.onnx").write_bytes(model)
    _age(version)
    await repository.reconcile()
    assert _served(repository) == [("mlp", 1)]
    (version / "model.onnx").unlink()  # gone for good: unloaded once it has settled
    _age(version)
    await repository.reconcile()
    assert _served(repository) == []
    await repository.close()


async def test_a_version_that_failed_is_tried_again_once_any_of_its_files_changes(
    tmp_path: Path,
) -> None:
    """Weights beside the model file, copied after it: the load failed on them, not on it."""
    write_mlp(tmp_path)
    version = tmp_path / "mlp" / "1"
    model = onnx.load(str(version / "model.onnx"))
    onnx.save(
        model,
        str(version / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    weights = (version / "weights.bin").read_bytes()
    (version / "weights.bin").write_bytes(weights[: len(weights) // 2])  # mid-copy
    _age(tmp_path / "mlp")
    repository = _repository(tmp_path)
    await repository.reconcile()
    assert _served(repository) == []
    await repository.reconcile()  # unchanged: not tried again at every scan
    assert _served(repository) == []

    (version / "weights.bin").write_bytes(weights)  # the copy completes; model.onnx unchanged
    _age(version / "weights.bin")
    await repository.reconcile()
    assert _served(repository) == [("mlp", 1)]
    await repository.close()


async def test_a_version_that_failed_is_tried_again_after_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cause outside its files (a GPU short of memory) may have passed."""
    write_mlp(tmp_path)
    _age(tmp_path / "mlp")
    failing = True
    load = runtimes.load

    def flaky(path: Path, config: ModelConfig) -> runtimes.Runtime:
        if failing:
            raise RuntimeError("CUDA out of memory")
        return load(path, config)

    monkeypatch.setattr(runtimes, "load", flaky)
    repository = _repository(tmp_path)
    await repository.reconcile()
    assert _served(repository) == []
    failing = False
    await repository.reconcile()
    assert _served(repository) == [], "tried again at once, at every scan"
    monkeypatch.setattr(repository_module, "RETRY_FAILED_S", 0)
    await repository.reconcile()
    assert _served(repository) == [("mlp", 1)]
    await repository.close()


class _FailingDevice:
    """A runtime whose calls fail as a CUDA context left unusable makes them fail, from
    `rows` rows on."""

    def __init__(self, inner: runtimes.Runtime, rows: int) -> None:
        self._inner, self._rows = inner, rows
        self.kind, self.device = inner.kind, "cuda:0"
        self.inputs, self.outputs = inner.inputs, inner.outputs

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if len(next(iter(batch.values()))) >= self._rows:
            raise runtimes.DeviceFailed("cuda:0: CUDA error: device-side assert triggered")
        return self._inner.run(batch)

    def close(self) -> None:
        self._inner.close()


@pytest.mark.parametrize("rows", [1, 64], ids=["one-row", "larger-batch"])
async def test_a_device_failing_while_a_model_warms_up_restarts_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows: int
) -> None:
    """Every later model would fail on that device too: a new process, not a model refused."""
    load = runtimes.load
    monkeypatch.setattr(
        repository_module.runtimes, "load", lambda *args: _FailingDevice(load(*args), rows)
    )
    write_mlp(tmp_path)
    crashes: list[BaseException] = []
    repository = ModelRepository(
        tmp_path,
        [],
        replies=None,  # type: ignore[arg-type]
        time_budget_s=5,
        max_tensor_elements=1 << 22,
        on_crash=crashes.append,
    )
    await repository.reconcile(settle_s=0)
    assert _served(repository) == []
    assert [type(exc) for exc in crashes] == [runtimes.DeviceFailed]
    await repository.close()


class _Answers:
    """Results, as the batcher hands them over: error codes kept."""

    def __init__(self) -> None:
        self.errors: list[ErrorCode] = []

    def error(self, ticket: Any, rejection: Rejection) -> None:
        self.errors.append(rejection.code)

    def ok_bodies(self, tickets: Any, bodies: Any) -> None:
        pass


class _Stuck:
    """A runtime whose call on a row whose first value is 13 runs until `release` is set."""

    def __init__(self, inner: runtimes.Runtime, release: threading.Event) -> None:
        self._inner, self._release = inner, release
        self.kind, self.device = inner.kind, inner.device
        self.inputs, self.outputs = inner.inputs, inner.outputs
        self.closed = False

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if (next(iter(batch.values()))[:, 0] == 13).any():
            self._release.wait()
        return self._inner.run(batch)

    def close(self) -> None:
        self.closed = True
        self._inner.close()


async def test_a_call_still_running_after_its_version_is_unloaded_is_still_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker stopping reads the count to tell a clean exit from a hung one: a thread that
    keeps the process from exiting must not drop out of it with its version."""
    release = threading.Event()
    load = runtimes.load
    monkeypatch.setattr(repository_module.runtimes, "load", lambda *a: _Stuck(load(*a), release))
    write_mlp(tmp_path)
    answers = _Answers()
    repository = ModelRepository(
        tmp_path,
        [],
        replies=answers,  # type: ignore[arg-type]
        time_budget_s=0.5,
        max_tensor_elements=1 << 22,
    )
    await repository.reconcile(settle_s=0)
    served = repository.served[("mlp", 1)]
    x = np.zeros((1, 32), np.float32)
    x[0, 0] = 13
    served.batcher.put(Job(make_ticket(b"{}"), {"x": x}, 1, None))
    try:
        await asyncio.sleep(0.2)
        assert repository.calls_running == 1
        await repository.close()  # as at shutdown: the batch times out, the version unloads
        assert answers.errors == [ErrorCode.TIMEOUT]
        assert repository.calls_running == 1
    finally:
        release.set()
    await _until_no_call_runs(repository)


async def test_a_model_that_hangs_loading_fails_its_load_and_the_others_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its warm-up never returns: past the load timeout it is a failed load, the models after
    it load, and its thread counts as running until it ends."""
    release = threading.Event()
    load = runtimes.load

    stuck: list[_Stuck] = []

    def loaded(path: Path, config: ModelConfig) -> runtimes.Runtime:
        runtime = load(path, config)
        if "aaa" not in str(path):
            return runtime
        stuck.append(_Stuck(runtime, release))
        return stuck[-1]

    monkeypatch.setattr(repository_module.runtimes, "load", loaded)
    write_mlp(tmp_path)
    shutil.copytree(tmp_path / "mlp", tmp_path / "aaa")  # loads first, by name
    warm_up = runtimes.warm_up

    def warm_up_13(runtime: runtimes.Runtime, sizes: list[int], length: int = 1) -> None:
        if isinstance(runtime, _Stuck):  # a row that hangs it, as some input may
            runtime.run({"x": np.full((1, 32), 13, np.float32)})
        warm_up(runtime, sizes, length)

    monkeypatch.setattr(repository_module.runtimes, "warm_up", warm_up_13)
    repository = ModelRepository(
        tmp_path,
        [],
        replies=None,  # type: ignore[arg-type]
        time_budget_s=5,
        max_tensor_elements=1 << 22,
        load_timeout_s=0.5,
    )
    try:
        await asyncio.wait_for(repository.reconcile(settle_s=0), 10)
        assert _served(repository) == [("mlp", 1)]
        assert (repository.calls_running, repository.loads_running) == (0, 1)
        assert not stuck[0].closed  # its warm-up still runs on it
    finally:
        release.set()
    await _until_no_call_runs(repository)
    for _ in range(100):  # closed once its warm-up let go, on a loader thread
        if stuck[0].closed:
            break
        await asyncio.sleep(0.02)
    assert stuck[0].closed
    await repository.close()


async def test_a_model_that_cannot_run_a_pixel_is_warmed_up_on_larger_images(
    tmp_path: Path,
) -> None:
    """Variable dimensions of 1 are only the first warm-up tried: a convolution without
    padding loads, and serves images as small as it takes."""
    write_unpadded_conv(tmp_path)
    repository = _repository(tmp_path)
    try:
        await repository.reconcile(settle_s=0)
        assert _served(repository) == [("conv", 1)]
        runtime = repository.served[("conv", 1)].runtime
        assert runtime.run({"x": np.ones((1, 1, 3, 3), np.float32)})["y"].tolist() == [[9, 9]]
    finally:
        await repository.close()


async def test_a_runtime_that_fails_its_warm_up_is_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It serves nothing: what it holds (a GPU's memory) goes back at once, not at some
    later collection, or after every retry of its load."""
    closed: list[str] = []
    load = runtimes.load

    class Counted(_Stuck):
        def close(self) -> None:
            closed.append("closed")
            super().close()

    monkeypatch.setattr(
        repository_module.runtimes, "load", lambda *a: Counted(load(*a), threading.Event())
    )

    def refused(runtime: runtimes.Runtime, sizes: list[int], length: int = 1) -> None:
        raise runtimes.NotBatchFirst("outputs of one row for two")

    monkeypatch.setattr(repository_module.runtimes, "warm_up", refused)
    write_mlp(tmp_path)
    repository = _repository(tmp_path)
    try:
        await repository.reconcile(settle_s=0)
        assert _served(repository) == []
        for _ in range(100):  # closed on a loader thread
            if closed:
                break
            await asyncio.sleep(0.02)
        assert closed == ["closed"]
    finally:
        await repository.close()


async def _until_no_call_runs(repository: ModelRepository) -> None:
    """Until the threads let go run to their end (2 s at most)."""
    for _ in range(100):
        if not repository.calls_running + repository.loads_running:
            return
        await asyncio.sleep(0.02)
    assert repository.calls_running + repository.loads_running == 0


async def test_a_config_that_is_a_broken_link_keeps_what_the_model_serves(tmp_path: Path) -> None:
    """A mounted config moved away: not a model without one, served with no settings."""
    write_mlp(tmp_path, config="max_batch_size = 8\n")
    repository = _repository(tmp_path)
    await repository.reconcile(settle_s=0)
    config = tmp_path / "mlp" / "config.toml"
    config.unlink()
    config.symlink_to(tmp_path / "moved.toml")
    await repository.reconcile(settle_s=0)
    assert repository.served[("mlp", 1)].config.max_batch_size == 8  # not reloaded
    await repository.close()


async def test_a_broken_link_in_a_version_directory_stops_no_version_loading(
    tmp_path: Path,
) -> None:
    write_mlp(tmp_path, 1)
    write_mlp(tmp_path, 2, seed=3)
    (tmp_path / "mlp" / "1" / "weights.bin").symlink_to(tmp_path / "gone.bin")
    repository = _repository(tmp_path)
    await repository.reconcile(settle_s=0)
    assert _served(repository) == [("mlp", 2)]
    await repository.close()


async def test_the_newest_version_copied_over_in_place_loads_no_older_one(tmp_path: Path) -> None:
    """Version 3 serves and is being rewritten: version 2 is not the newest meanwhile."""
    write_mlp(tmp_path, 2)
    write_mlp(tmp_path, 3, seed=3)
    _age(tmp_path / "mlp")
    repository = _repository(tmp_path)
    await repository.reconcile()
    assert _served(repository) == [("mlp", 3)]
    model = tmp_path / "mlp" / "3" / "model.onnx"
    model.write_bytes(model.read_bytes())  # written just now: still settling
    await repository.reconcile()
    assert _served(repository) == [("mlp", 3)]
    _age(tmp_path / "mlp")
    await repository.reconcile()
    assert _served(repository) == [("mlp", 3)]
    await repository.close()


def test_the_runtime_setting_picks_its_own_file_where_a_version_holds_several(
    tmp_path: Path,
) -> None:
    path = write_mlp(tmp_path)
    torch_file = path.with_name("model.pt")
    torch_file.write_bytes(b"a TorchScript file")
    assert runtimes.find_artifact(path.parent) == path
    assert runtimes.find_artifact(path.parent, "torch") == torch_file
    assert runtimes.find_artifact(path.parent, "onnx") == path


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        ({"versions": [2]}, r"versions \[2\] apply to version_policy 'specific', not 'latest'"),
        (
            {"version_policy": "all", "latest_versions": 2},
            "latest_versions applies to version_policy 'latest', not 'all'",
        ),
    ],
)
def test_version_settings_another_policy_would_ignore_are_refused(
    settings: dict[str, Any], error: str
) -> None:
    with pytest.raises(ConfigError, match=error):
        convert(settings, ModelConfig, "mlp/config.toml")
