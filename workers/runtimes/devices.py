"""Which accelerator a model runs on, decided once at load time."""

from __future__ import annotations

import ctypes
import functools

import structlog

log = structlog.get_logger("surge.runtimes")


@functools.cache
def cuda_device_count() -> int:
    """CUDA devices visible to this process, 0 without a driver (asks the driver, not torch)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def resolve_device(requested: str) -> str:
    """`auto` -> `cuda:0` when a GPU is visible, else `cpu`; `cuda` -> `cuda:0`.

    Asking for CUDA where there is none falls back to the CPU: a worker image built for GPUs
    still serves on a CPU-only node, and says so in its logs.
    """
    if requested == "cpu":
        return "cpu"
    count = cuda_device_count()
    if count == 0:
        if requested != "auto":
            log.warning("cuda_not_visible", requested=requested, serving_on="cpu")
        return "cpu"
    if requested in ("auto", "cuda"):
        return "cuda:0"
    if int(requested.partition(":")[2]) >= count:
        raise ValueError(f"device {requested!r}: this process sees {count} GPU(s)")
    return requested
