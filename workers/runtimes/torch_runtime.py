"""PyTorch: TorchScript (`model.pt`) or `torch.export` archives (`model.pt2`), CPU or CUDA.

Load models only from a trusted model root: a `torch.export` archive may carry pickled
tensors, which torch unpickles in full (as any checkpoint), running whatever code they name.
On a GPU each executor thread (one per model instance) runs on a CUDA stream of its own, with
inputs copied from pinned host memory and outputs into it, so that one instance's copies
overlap another's compute.
"""

from __future__ import annotations

import threading
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import structlog
import torch
from torch.export.passes import move_to_device_pass

from surge.config import ModelConfig
from surge.workers.runtimes.base import DeviceFailed, TensorSpec, intra_op_threads, is_cuda_failure
from surge.workers.runtimes.devices import resolve_device

log = structlog.get_logger("surge.runtimes")


class TorchRuntime:
    kind = "torch"

    def __init__(self, path: Path, config: ModelConfig) -> None:
        if not config.inputs or not config.outputs:
            raise ValueError("a PyTorch model needs [[inputs]] and [[outputs]] in its config.toml")
        self.inputs = tuple(TensorSpec.from_config(c) for c in config.inputs)
        self.outputs = tuple(TensorSpec.from_config(c) for c in config.outputs)
        if strings := [
            spec.name for spec in (*self.inputs, *self.outputs) if spec.dtype.kind == "O"
        ]:
            raise ValueError(f"{strings}: BYTES, which PyTorch tensors cannot hold")
        self.device = resolve_device(config.device)
        if self.device != "cpu" and not torch.cuda.is_available():
            # The driver sees a GPU that this torch build cannot use (a CPU-only build, or a
            # driver older than its CUDA): serve on the CPU, as where there is no GPU at all.
            log.warning("cuda_unavailable_to_torch", model=str(path), torch=torch.__version__)
            self.device = "cpu"
        if threads := intra_op_threads(config, shared_pool=False):
            torch.set_num_threads(threads)  # for the whole process: the last model's wins
        module = load_module(path, self.device)
        self._dtype = _PRECISIONS[config.precision]
        self._module = module.to(self._dtype) if self._dtype != torch.float32 else module
        self._output_dtypes = [_torch_dtype(spec) for spec in self.outputs]
        self._output_kinds = [None if d is None else _kind(d) for d in self._output_dtypes]
        self._cuda = self.device.startswith("cuda")
        self._streams = threading.local()  # a CUDA stream per executor thread
        if self._cuda:  # the weights' copies ran on the default stream: done before any other
            torch.cuda.synchronize(self.device)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._cuda:
            stream = self._stream()
            try:
                with torch.inference_mode(), torch.cuda.stream(stream):
                    outputs = self._outputs(self._forward(inputs))
                stream.synchronize()  # the copies back to pinned memory were asynchronous
            except RuntimeError as exc:  # torch.AcceleratorError among them
                if is_cuda_failure(exc):
                    raise DeviceFailed(f"{self.device}: {exc}") from exc
                raise
        else:
            with torch.inference_mode():
                outputs = self._outputs(self._forward(inputs))
        return {
            spec.name: tensor.numpy() for spec, tensor in zip(self.outputs, outputs, strict=True)
        }

    def _forward(self, inputs: Mapping[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        """Run the module; on a GPU the inputs go through pinned memory, asynchronously."""
        args = []
        for spec in self.inputs:
            tensor = torch.from_numpy(_writable(inputs[spec.name]))
            if self._cuda:
                tensor = tensor.pin_memory()
            args.append(_cast(tensor.to(self.device, non_blocking=self._cuda), self._dtype))
        result = self._module(*args)
        if isinstance(result, torch.Tensor):
            result = (result,)
        elif isinstance(result, Mapping):
            result = tuple(result[spec.name] for spec in self.outputs)
        if len(result) != len(self.outputs):
            raise ValueError(
                f"model returned {len(result)} outputs, config declares {len(self.outputs)}"
            )
        return tuple(result)

    def _outputs(self, result: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """Host tensors in the declared types; from a GPU, copied into pinned memory."""
        host = []
        declared = zip(self._output_dtypes, self._output_kinds, strict=True)
        for tensor, (dtype, kind) in zip(result, declared, strict=True):
            tensor = tensor.detach()
            if dtype is not None and _kind(tensor.dtype) == kind:
                # Within a kind (fp16 computed, FP32 declared): converted. Across kinds left
                # as they are, for the check of declared outputs to see: a label declared
                # where a score comes (outputs declared in another order) is no conversion.
                tensor = tensor.to(dtype)
            if self._cuda:
                target = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                host.append(target.copy_(tensor, non_blocking=True))
            else:
                host.append(tensor.cpu())
        return host

    def _stream(self) -> torch.cuda.Stream:
        stream = getattr(self._streams, "stream", None)
        if stream is None:
            stream = self._streams.stream = torch.cuda.Stream(device=self.device)
        return stream

    def close(self) -> None:
        del self._module
        if self._cuda:
            torch.cuda.empty_cache()


def load_module(path: Path, device: str) -> torch.nn.Module:
    """A `torch.export` archive or a TorchScript file, on `device`.

    An exported graph names the device of every tensor it creates (a transformer's position
    ids and attention masks, say) as it was when exported: moving only its weights would
    leave those behind, so the graph itself is rewritten for the device, the CPU included.
    TorchScript's traced graphs keep such devices too, and cannot be rewritten: a graph
    traced for another device is served as it is, with a warning that says why its
    calls fail (trace it on the device that serves it, or ship a torch.export archive).
    """
    if path.suffix == ".pt2":
        try:
            program = torch.export.load(str(path))
        except RuntimeError as exc:
            # torch loads the weights to the device they were saved on, before they can be
            # moved, and logs why a load failed rather than saying it.
            if not _saved_on_a_gpu(path):
                raise
            raise ValueError(
                f"{exc} Its weights were saved on a GPU, and load only where that GPU is: "
                "export it on the CPU; it is then moved to the device that serves it."
            ) from exc
        return move_to_device_pass(program, device).module()
    module = torch.jit.load(str(path), map_location=device).eval()
    # `cuda:1` is another device than the `cuda:0` a graph was traced on; `cuda` means 0.
    if foreign := {d for d in traced_devices(module) if not _same_device(d, device)}:
        log.warning(
            "torchscript_traced_for_another_device",
            model=str(path),
            serving_on=device,
            traced_for=sorted(foreign),
            hint="trace it on the device that serves it, or ship a torch.export archive",
        )
    return module


def _saved_on_a_gpu(path: Path) -> bool:
    """Whether an archive's tensors were saved on a CUDA device (its payload config says)."""
    try:
        with zipfile.ZipFile(path) as archive:
            configs = [n for n in archive.namelist() if n.endswith(".json")]
            return any(b'"type": "cuda"' in archive.read(name) for name in configs)
    except (OSError, zipfile.BadZipFile):
        return False


def traced_devices(module: torch.jit.ScriptModule) -> set[str]:
    """The devices a TorchScript graph names as constants, where it makes tensors on a fixed
    device (as tracing records `device=x.device`)."""
    graph = module.inlined_graph  # submodules' calls included
    return {
        str(node.output().toIValue())
        for node in graph.findAllNodes("prim::Constant")
        if isinstance(node.output().type(), torch._C.DeviceObjType)
    }


def _same_device(a: str, b: str) -> bool:
    first, second = torch.device(a), torch.device(b)
    if first.type != second.type:
        return False
    return first.type == "cpu" or (first.index or 0) == (second.index or 0)


_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _torch_dtype(spec: TensorSpec) -> torch.dtype | None:
    """The torch type an output is declared as (None: one torch has no type for)."""
    try:
        return torch.from_numpy(np.empty(0, spec.dtype.newbyteorder("="))).dtype
    except TypeError:
        return None


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "integer"


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP32 inputs in the model's precision. Others as declared: integers (token ids), and
    FP64 or FP16 ones, which a model declares so because it computes in them."""
    return tensor.to(dtype) if tensor.dtype == torch.float32 and dtype != torch.float32 else tensor


def _writable(array: np.ndarray) -> np.ndarray:
    """torch tensors need writable memory; zero-copy request arrays are read-only views."""
    return array if array.flags.writeable and array.flags.c_contiguous else array.copy()
