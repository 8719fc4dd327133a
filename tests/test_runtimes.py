"""Runtimes behind one contract, and the batch arithmetic around them."""

from __future__ import annotations

import ctypes
import gc
import weakref
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from structlog.testing import capture_logs

from surge.config import ModelConfig, TensorConfig
from surge.examples import MLP_FEATURES, mlp_model, write_mlp
from surge.schemas import row_tensors, to_array
from surge.workers import ModelRepository, runtimes
from surge.workers.batching import check_rows, group_by_shape, stack
from surge.workers.intake import Job
from surge.workers.runtimes import TensorSpec, devices, torch_runtime
from surge.workers.runtimes.base import intra_op_threads, is_cuda_failure
from surge.workers.runtimes.devices import resolve_device
from surge.workers.runtimes.onnx_runtime import IoBinding, host_buffer
from surge.workers.runtimes.torch_runtime import load_module


class Affine(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))


def test_onnx_runtime_reads_its_signature(tmp_path: Path) -> None:
    path = write_mlp(tmp_path)
    runtime = runtimes.load(path, ModelConfig(device="cpu"))
    assert runtime.inputs == (TensorSpec("x", "FP32", (32,)),)
    assert runtime.outputs == (TensorSpec("probs", "FP32", (10,)),)
    out = runtime.run({"x": np.zeros((5, 32), np.float32)})["probs"]
    assert out.shape == (5, 10)
    np.testing.assert_allclose(out.sum(axis=1), 1, rtol=1e-5)


@pytest.mark.parametrize(
    ("configured", "instances", "expected"),
    # One ONNX Runtime pool serves all instances: its threads plus each calling thread.
    [(0, 1, 0), (0, 2, 7), (0, 3, 6), (0, 16, 1), (3, 2, 3)],
)
def test_instances_split_the_cpus_unless_threads_are_set(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    configured: int,
    instances: int,
    expected: int,
) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    config = ModelConfig(device="cpu", instances=instances, intra_op_threads=configured)
    runtime = runtimes.load(write_mlp(tmp_path), config)
    assert runtime._session.get_session_options().intra_op_num_threads == expected


def test_pytorch_instances_each_get_a_share_of_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """PyTorch's OpenMP gives each concurrent call a team of the configured size."""
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    split = [intra_op_threads(ModelConfig(instances=n), shared_pool=False) for n in (1, 2, 3, 16)]
    assert split == [0, 4, 2, 1]


def test_io_binding_matches_a_plain_run(tmp_path: Path) -> None:
    """The GPU path's binding (pinned staging, outputs on the device), run here with host
    memory in both roles: batches of changing size, several threads at once."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(write_mlp(tmp_path)), providers=["CPUExecutionProvider"])
    binding = IoBinding(session, "cpu", 0, pinned=False)
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((rows, 32)).astype(np.float32) for rows in (3, 64, 1, 256, 7)]

    def check(batch: np.ndarray) -> None:
        bound = binding.run({"x": batch}, ["probs"])["probs"]
        np.testing.assert_array_equal(bound, session.run(["probs"], {"x": batch})[0])

    for batch in batches:
        check(batch)
    check(batches[3][:, :][::2])  # a strided view is made contiguous first
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(check, batches * 8))


needs_gpu = pytest.mark.skipif(resolve_device("auto") == "cpu", reason="needs a GPU")
needs_onnx_cuda = pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="needs onnxruntime-gpu (this onnxruntime has no CUDA provider)",
)


@needs_gpu
@needs_onnx_cuda
def test_onnx_on_a_gpu_matches_the_cpu(tmp_path: Path) -> None:
    """Through the CUDA provider's I/O binding, from several threads at once (as instances
    call it), batches of changing size: each thread's pinned staging buffers grow and are
    reused without one thread's rows leaking into another's results."""
    path = write_mlp(tmp_path)
    gpu = runtimes.load(path, ModelConfig(device="cuda", instances=4))
    cpu = runtimes.load(path, ModelConfig(device="cpu"))
    assert gpu.device == "cuda:0"
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((rows, 32)).astype(np.float32) for rows in (64, 3, 256, 1, 64)]

    def check(x: np.ndarray) -> None:
        expected = cpu.run({"x": x})["probs"]
        np.testing.assert_allclose(gpu.run({"x": x})["probs"], expected, atol=1e-5)

    for x in batches:
        check(x)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(check, batches * 16))


@needs_gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_torch_on_a_gpu_matches_the_cpu(tmp_path: Path, precision: str) -> None:
    """On CUDA streams of their own, from several threads at once, in each precision."""
    torch.manual_seed(0)
    module = Affine().eval()
    path = tmp_path / "model.pt"
    torch.jit.script(module).save(str(path))
    gpu = runtimes.load(path, _affine_config(precision, device="cuda"))
    assert gpu.device == "cuda:0"
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((rows, 8)).astype(np.float32) for rows in (7, 1, 512, 33)]
    tolerance = 1e-5 if precision == "fp32" else 0.05

    def check(x: np.ndarray) -> None:
        with torch.inference_mode():
            expected = module(torch.from_numpy(x)).numpy()
        y = gpu.run({"x": x})["y"]
        assert y.dtype == np.float32
        np.testing.assert_allclose(y, expected, atol=tolerance)

    for x in batches:
        check(x)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(check, batches * 16))
    runtimes.warm_up(gpu, [1, 64])
    gpu.close()


def test_pinned_host_buffers_fall_back_to_ordinary_memory() -> None:
    """Without a GPU, asking for page-locked memory still gives a usable buffer."""
    owner, pointer = host_buffer(64, pinned=True)
    assert pointer
    ctypes.memmove(pointer, b"x" * 64, 64)
    assert bytes(memoryview(owner.numpy() if hasattr(owner, "numpy") else owner)) == b"x" * 64


def _affine_config(precision: str = "fp32", device: str = "cpu") -> ModelConfig:
    return ModelConfig(
        device=device,
        precision=precision,  # type: ignore[arg-type]
        inputs=[TensorConfig(name="x", datatype="FP32", shape=[8])],
        outputs=[TensorConfig(name="y", datatype="FP32", shape=[3])],
    )


def _affine_reference(module: Affine) -> tuple[np.ndarray, np.ndarray]:
    """Inputs, and what the eager module in fp32 makes of them."""
    x = np.random.default_rng(0).standard_normal((7, 8)).astype(np.float32)
    with torch.inference_mode():
        return x, module(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_torch_models_run_in_reduced_precision(tmp_path: Path, precision: str) -> None:
    torch.manual_seed(0)
    module = Affine().eval()
    path = tmp_path / "model.pt"
    torch.jit.script(module).save(str(path))
    runtime = runtimes.load(path, _affine_config(precision=precision))
    x, expected = _affine_reference(module)
    y = runtime.run({"x": x})["y"]
    assert y.dtype == np.float32  # as declared, whatever the model computed in
    np.testing.assert_allclose(y, expected, atol=0.05)
    assert not np.array_equal(y, expected)  # it really ran in the reduced precision


def test_torch_inputs_declared_fp64_reach_a_double_model_as_doubles(tmp_path: Path) -> None:
    """The precision setting is for FP32 inputs; a model declaring FP64 computes in it."""
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 1).double().eval()
    path = tmp_path / "model.pt"
    torch.jit.script(module).save(str(path))
    config = ModelConfig(
        inputs=[TensorConfig(name="x", datatype="FP64", shape=[3])],
        outputs=[TensorConfig(name="y", datatype="FP64", shape=[1])],
    )
    runtime = runtimes.load(path, config)
    x = np.array([[1e-9, 2.0, 2**40]], np.float64)  # float32 would round these
    with torch.inference_mode():
        expected = module(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(runtime.run({"x": x})["y"], expected)


def _fixed_batch_mlp(directory: Path, rows: int) -> Path:
    path = directory / str(rows) / "model.onnx"
    path.parent.mkdir()
    model = mlp_model()
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = rows  # exported without dynamic axes
    onnx.save(model, str(path))
    return path


def test_an_onnx_graph_with_a_fixed_batch_dimension_loads_only_at_that_size(
    tmp_path: Path,
) -> None:
    """Batches of any other size would fail at every call: said once, at load."""
    one = _fixed_batch_mlp(tmp_path, 1)
    with pytest.raises(ValueError, match=r"fixed at 1: .*max_batch_size = 1"):
        runtimes.load(one, ModelConfig())
    runtime = runtimes.load(one, ModelConfig(max_batch_size=1))
    assert runtime.run({"x": np.ones((1, MLP_FEATURES), np.float32)})["probs"].shape == (1, 10)
    with pytest.raises(ValueError, match=r"fixed at 4: export it with a dynamic batch dimension$"):
        runtimes.load(_fixed_batch_mlp(tmp_path, 4), ModelConfig(max_batch_size=4))


def test_an_onnx_tensor_of_unknown_rank_must_be_declared(tmp_path: Path) -> None:
    """A graph that says nothing of a tensor's dimensions is not one of no dimensions
    beside the batch's: requests shaped as the model takes them would all be refused."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "model.onnx")
    with pytest.raises(ValueError, match=r"'x' has no dimensions.*under \[\[inputs\]\]"):
        runtimes.load(tmp_path / "model.onnx", ModelConfig())
    declared = ModelConfig(
        inputs=[TensorConfig(name="x", datatype="FP32", shape=[3])],
        outputs=[TensorConfig(name="y", datatype="FP32", shape=[3])],
    )
    runtime = runtimes.load(tmp_path / "model.onnx", declared)
    assert runtime.run({"x": -np.ones((2, 3), np.float32)})["y"].tolist() == [[0] * 3] * 2


def test_a_model_whose_outputs_are_not_batch_first_fails_its_warm_up(tmp_path: Path) -> None:
    """Time-major, its rows could not be split by request: said at load. At one row its
    variable time dimension, warmed at 1, hides it: a larger size tells."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0])],
        "time_major",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "time"])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["time", "batch"])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    (tmp_path / "time_major" / "1").mkdir(parents=True)
    onnx.save(model, tmp_path / "time_major" / "1" / "model.onnx")
    runtime = runtimes.load(tmp_path / "time_major" / "1" / "model.onnx", ModelConfig())
    runtimes.warm_up(runtime, [1])
    with pytest.raises(runtimes.NotBatchFirst, match=r"'y' has shape \[1, 4\] for a batch of 4"):
        runtimes.warm_up(runtime, [1, 4])
    runtimes.warm_up(runtimes.load(write_mlp(tmp_path), ModelConfig()), [1, 4])


def _repository(root: Path) -> ModelRepository:
    return ModelRepository(
        root,
        [],
        replies=None,  # type: ignore[arg-type]
        time_budget_s=5,
        max_tensor_elements=1 << 22,
    )


async def test_a_model_whose_outputs_are_not_batch_first_is_not_served(tmp_path: Path) -> None:
    test_a_model_whose_outputs_are_not_batch_first_fails_its_warm_up(tmp_path)
    repository = _repository(tmp_path)
    try:
        await repository.reconcile(settle_s=0)
        assert sorted(repository.served) == [("mlp", 1)]
    finally:
        await repository.close()


def _one_row_at_a_time(model_root: Path, batch: int) -> None:
    """A graph whose declared batch dimension is dynamic, but which reshapes to one row."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Reshape", ["x", "one_row"], ["y"])],
        "one_row",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])],
        [onnx.numpy_helper.from_array(np.array([1, 4], np.int64), "one_row")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    (model_root / "one_row" / "1").mkdir(parents=True)
    onnx.save(model, model_root / "one_row" / "1" / "model.onnx")
    (model_root / "one_row" / "config.toml").write_text(f"max_batch_size = {batch}\n")


@pytest.mark.parametrize("batch", [64, 1])
async def test_a_model_that_runs_one_row_at_a_time_is_served_only_so(
    tmp_path: Path, batch: int
) -> None:
    """Served with batches, every one would fail and be split down to single requests: said
    at load, where it is refused unless its config says max_batch_size = 1."""
    _one_row_at_a_time(tmp_path, batch)
    write_mlp(tmp_path)
    repository = _repository(tmp_path)
    try:
        with capture_logs() as logs:
            await repository.reconcile(settle_s=0)
        if batch == 1:
            assert sorted(repository.served) == [("mlp", 1), ("one_row", 1)]
        else:
            assert sorted(repository.served) == [("mlp", 1)]
            (failed,) = [log for log in logs if log["event"] == "model_load_failed"]
            assert "runs one row but not two" in failed["error"]
            assert "max_batch_size = 1" in failed["error"]
    finally:
        await repository.close()


class _TwoOutputs(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.softmax(x[:, :2], dim=1), x[:, :3] * 0.5


@pytest.mark.parametrize(
    ("declared", "error"),
    [
        pytest.param(
            [("embedding", "FP32", [3]), ("probs", "FP32", [2])],
            r"output 'embedding' is float32 of shape \[2, 2\] for a batch of 2, declared FP32 "
            r"of shape \['batch', 3\]",
            id="declared-in-another-order",
        ),
        pytest.param(
            [("probs", "FP32", [2]), ("embedding", "FP32", [3, 1])],
            r"output 'embedding' is float32 of shape \[2, 3\]",
            id="rank",
        ),
    ],
)
def test_outputs_unlike_those_declared_fail_the_warm_up(
    tmp_path: Path, declared: list[tuple[str, str, list[int]]], error: str
) -> None:
    """Served, they would go out under each other's names, or cut and cast."""
    path = tmp_path / "model.pt"
    torch.jit.script(_TwoOutputs()).save(str(path))
    config = ModelConfig(
        inputs=[TensorConfig(name="x", datatype="FP32", shape=[4])],
        outputs=[TensorConfig(name=n, datatype=t, shape=d) for n, t, d in declared],
    )
    runtime = runtimes.load(path, config)
    with pytest.raises(runtimes.OutputsUnlikeDeclared, match=error):
        runtimes.warm_up(runtime, [2])
    good = [
        TensorConfig(name="probs", datatype="FP32", shape=[2]),
        TensorConfig(name="embedding", datatype="FP32", shape=[-1]),
    ]
    runtimes.warm_up(runtimes.load(path, ModelConfig(inputs=config.inputs, outputs=good)), [2])


class _ScoreAndLabel(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, :1] * 0.5, (x[:, :1] * 10).to(torch.int64)


def test_a_torch_output_of_another_kind_than_declared_fails_the_warm_up(tmp_path: Path) -> None:
    """A score and a label declared in each other's places: each converted to the other's
    type, they would load and go out under each other's names."""
    path = tmp_path / "model.pt"
    torch.jit.script(_ScoreAndLabel()).save(str(path))
    inputs = [TensorConfig(name="x", datatype="FP32", shape=[4])]
    swapped = [
        TensorConfig(name="label", datatype="INT64", shape=[1]),
        TensorConfig(name="score", datatype="FP32", shape=[1]),
    ]
    runtime = runtimes.load(path, ModelConfig(inputs=inputs, outputs=swapped))
    with pytest.raises(runtimes.OutputsUnlikeDeclared, match=r"'label' is float32 .* INT64"):
        runtimes.warm_up(runtime, [2])
    right = [*reversed(swapped)]
    half = ModelConfig(inputs=inputs, outputs=right, precision="fp16")  # computed in fp16
    outputs = runtimes.load(path, half).run({"x": np.full((2, 4), 0.7, np.float32)})
    assert outputs["score"].dtype == np.float32  # converted, as declared
    assert outputs["label"].tolist() == [[7], [7]]


def test_an_onnx_output_declared_as_another_type_fails_the_warm_up(tmp_path: Path) -> None:
    config = ModelConfig(
        inputs=[TensorConfig(name="x", datatype="FP32", shape=[MLP_FEATURES])],
        outputs=[TensorConfig(name="probs", datatype="FP64", shape=[10])],
    )
    runtime = runtimes.load(write_mlp(tmp_path), config)
    unlike = r"'probs' is float32 .* declared FP64"
    with pytest.raises(runtimes.OutputsUnlikeDeclared, match=unlike):
        runtimes.warm_up(runtime, [1])


def test_a_torch_model_refuses_bytes_tensors(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.jit.script(Affine()).save(str(path))
    config = ModelConfig(
        inputs=[TensorConfig(name="x", datatype="BYTES", shape=[1])],
        outputs=[TensorConfig(name="y", datatype="FP32", shape=[3])],
    )
    with pytest.raises(ValueError, match=r"\['x'\]: BYTES, which PyTorch tensors cannot hold"):
        runtimes.load(path, config)


def test_onnx_models_refuse_a_precision_setting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="PyTorch"):
        runtimes.load(write_mlp(tmp_path), ModelConfig(precision="fp16"))


def test_torch_export_archive_matches_eager(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = Affine().eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    example = (torch.randn(2, 8),)
    program = torch.export.export(module, example, dynamic_shapes=({0: batch},))
    path = tmp_path / "model.pt2"
    torch.export.save(program, str(path))
    runtime = runtimes.load(path, _affine_config())
    x, expected = _affine_reference(module)
    np.testing.assert_allclose(runtime.run({"x": x})["y"], expected, rtol=1e-5, atol=1e-6)
    runtimes.warm_up(runtime, [1, 16])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_an_archive_saved_with_its_weights_on_a_gpu_says_to_export_on_the_cpu(
    tmp_path: Path,
) -> None:
    """torch loads an archive's weights to the device they were saved on, before the runtime
    can move them: where that GPU is not, the load says how to export instead."""
    program = torch.export.export(Affine().eval(), (torch.randn(2, 8),))
    saved = tmp_path / "saved.pt2"
    torch.export.save(program, str(saved))
    path = tmp_path / "model.pt2"
    with zipfile.ZipFile(saved) as source, zipfile.ZipFile(path, "w") as archive:
        for entry in source.infolist():  # as if saved on cuda:0: its payloads say where
            data = source.read(entry.filename)
            if entry.filename.endswith(".json"):
                data = data.replace(
                    b'"device": {"type": "cpu", "index": null}',
                    b'"device": {"type": "cuda", "index": 0}',
                )
            archive.writestr(entry, data)
    with pytest.raises(ValueError, match=r"saved on a GPU, .*: export it on the CPU"):
        runtimes.load(path, _affine_config())


class Positions(torch.nn.Module):
    """Makes a tensor in its graph, as a transformer makes its position ids and masks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.arange(x.shape[1], device=x.device)


def test_an_exported_graph_moves_whole_to_the_serving_device(tmp_path: Path) -> None:
    """torch.export records the device of tensors made in the graph (the CPU here): loaded
    for another device, those must move with the weights. The meta device stands in for a
    GPU: a CPU tensor left in the graph cannot meet a meta one."""
    example = (torch.zeros(2, 5),)
    dims = ({0: torch.export.Dim("rows", max=64), 1: torch.export.Dim("width", max=64)},)
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(Positions(), example, dynamic_shapes=dims), str(path))
    assert "device(type='cpu')" in torch.export.load(str(path)).graph_module.code
    out = load_module(path, "meta")(torch.zeros(3, 7, device="meta"))
    assert out.device.type == "meta"
    assert out.shape == (3, 7)
    np.testing.assert_array_equal(
        load_module(path, "cpu")(torch.zeros(1, 4)).numpy(), [[0, 1, 2, 3]]
    )


def test_a_graph_traced_for_another_device_is_named_in_a_warning(tmp_path: Path) -> None:
    """Tracing records the device of tensors the graph makes, and TorchScript cannot move
    them: served elsewhere (the meta device stands in for a GPU), its calls would fail, so
    loading says why. A graph served where it was traced loads quietly."""
    path = tmp_path / "model.pt"
    torch.jit.trace(Positions(), (torch.zeros(2, 5),)).save(str(path))
    with capture_logs() as logs:
        load_module(path, "cpu")
    assert logs == []
    with capture_logs() as logs:
        load_module(path, "meta")
    assert [(e["event"], e["traced_for"]) for e in logs] == [
        ("torchscript_traced_for_another_device", ["cpu"])
    ]


def test_torch_models_need_a_declared_signature(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\[\[inputs\]\]"):
        runtimes.load(tmp_path / "model.pt2", ModelConfig())


def test_cuda_falls_back_to_cpu_without_a_gpu() -> None:
    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("cuda") == "cpu"
        assert resolve_device("auto") == "cpu"


def test_a_gpu_index_this_process_does_not_see_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 2)
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match="sees 2 GPU"):
        resolve_device("cuda:2")


def test_torch_serves_on_the_cpu_where_the_driver_sees_a_gpu_torch_cannot_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.manual_seed(0)
    module = Affine().eval()
    path = tmp_path / "model.pt"
    torch.jit.script(module).save(str(path))
    with capture_logs() as logs:
        runtime = runtimes.load(path, _affine_config(device="cuda"))
    assert runtime.device == "cpu"
    assert [e["event"] for e in logs] == ["cuda_unavailable_to_torch"]
    x, expected = _affine_reference(module)
    np.testing.assert_allclose(runtime.run({"x": x})["y"], expected, rtol=1e-5)


def _job(**arrays: np.ndarray) -> Job:
    rows = next(iter(arrays.values())).shape[0]
    return Job(ticket=None, inputs=arrays, rows=rows, outputs=None)  # type: ignore[arg-type]


def test_stack_and_split_round_trip_rows() -> None:
    specs = [TensorSpec("x", "FP32", (4,))]
    jobs = [_job(x=np.full((r, 4), r, np.float32)) for r in (1, 3, 2)]
    batch = stack(jobs, specs)["x"]
    assert batch.shape == (6, 4)
    rows = [job.rows for job in jobs]
    check_rows({"y": batch}, sum(rows))
    for binary in (True, False):
        parts = row_tensors("y", batch * 10, rows, binary=binary)
        for job, part in zip(jobs, parts, strict=True):
            np.testing.assert_array_equal(to_array(part), job.inputs["x"] * 10)
    with pytest.raises(ValueError, match="rows"):
        check_rows({"y": batch[:5]}, sum(rows))
    empty = row_tensors("e", np.zeros((6, 0), np.float32), rows, binary=True)
    assert [to_array(t).shape for t in empty] == [(1, 0), (3, 0), (2, 0)]


def test_variable_length_inputs_pad_or_bucket() -> None:
    padded = [TensorSpec("ids", "INT64", (-1,), pad_value=0)]
    bucketed = [TensorSpec("ids", "INT64", (-1,))]
    jobs = [_job(ids=np.ones((1, n), np.int64)) for n in (3, 5, 3)]
    assert len(group_by_shape(jobs, padded)) == 1
    assert [len(g) for g in group_by_shape(jobs, bucketed)] == [2, 1]
    batch = stack(jobs, padded)["ids"]
    assert batch.shape == (3, 5)
    np.testing.assert_array_equal(batch.sum(axis=1), [3, 5, 3])


def test_asking_for_a_gpu_where_none_is_visible_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 0)
    with capture_logs() as logs:
        assert resolve_device("cuda:0") == "cpu"
        assert resolve_device("auto") == "cpu"  # auto asked for nothing in particular
    assert [(e["event"], e["requested"]) for e in logs] == [("cuda_not_visible", "cuda:0")]


def test_traced_devices_differ_by_index_too() -> None:
    assert torch_runtime._same_device("cuda", "cuda:0")
    assert not torch_runtime._same_device("cuda:0", "cuda:1")
    assert not torch_runtime._same_device("cuda:0", "cpu")
    assert torch_runtime._same_device("cpu", "cpu")


def test_closing_an_onnx_model_releases_its_session(tmp_path: Path) -> None:
    """I/O binding holds the session too: closed, nothing may keep its memory alive."""
    runtime = runtimes.load(write_mlp(tmp_path), ModelConfig(device="cpu"))
    runtime._binding = IoBinding(runtime._session, "cpu", 0, pinned=False)
    session = weakref.ref(runtime._session)
    runtime.close()
    gc.collect()
    assert session() is None


def test_only_errors_that_break_the_cuda_context_count_as_a_failed_device() -> None:
    assert is_cuda_failure(torch.AcceleratorError("CUDA error: device-side assert triggered"))
    assert is_cuda_failure(RuntimeError("CUDA failure 700: an illegal memory access"))
    assert is_cuda_failure(RuntimeError("CUDA error cudaErrorLaunchFailure:unspecified"))
    # One call's failures: the batch is halved to find the request, as for any model error.
    assert not is_cuda_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_cuda_failure(
        RuntimeError("CUDA error cudaErrorInvalidConfiguration:invalid configuration argument")
    )
    assert not is_cuda_failure(
        torch.AcceleratorError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling cublasLt")
    )
