"""Which implementations of the fused ops this machine has, and which one `auto` picks.

| backend     | where                                    | what it is                                  |
| ----------- | ---------------------------------------- | ------------------------------------------- |
| `reference` | any device                               | naive PyTorch, materialises logits (oracle) |
| `chunked`   | any device                               | pure PyTorch, token-chunked                 |
| `triton`    | CUDA; CPU only under TRITON_INTERPRET=1  | fused Triton kernels (`alignfast.kernels`)  |
| `cpp`       | CPU                                      | `alignfast._C` row kernels between BLAS calls |
| `cuda`      | CUDA                                     | `alignfast._C` CUDA kernels                 |
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

ALL_BACKENDS = ("reference", "chunked", "triton", "cpp", "cuda")


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _has_native(device_type: str) -> bool:
    from alignfast import _native

    return _native.has_kernels(device_type)


def _available_on(backend: str, device_type: str) -> bool:
    if backend in ("reference", "chunked"):
        return True
    if backend == "triton":
        return _has_triton() and (device_type == "cuda" or (device_type == "cpu" and triton_interpreted()))
    if backend == "cpp":
        return device_type == "cpu" and _has_native("cpu")
    if backend == "cuda":
        return device_type == "cuda" and _has_native("cuda")
    return False


def backends(device: str | torch.device | None = None) -> list[str]:
    """The backends usable here: on `device` if given, else on any device this machine has."""
    if device is not None:
        types = [torch.device(device).type]
    else:
        types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [b for b in ALL_BACKENDS if any(_available_on(b, t) for t in types)]


def resolve(backend: str, device: torch.device, *, supported: tuple[str, ...] = ALL_BACKENDS) -> str:
    """Turns a user's `backend=` into a concrete, available backend for tensors on `device`."""
    if not isinstance(backend, str) or (backend != "auto" and backend not in ALL_BACKENDS):
        raise ValueError(f"backend={backend!r} is unknown; choose 'auto' or one of {list(ALL_BACKENDS)}")
    usable = [b for b in supported if _available_on(b, device.type)]
    if backend == "auto":
        return _auto(device.type, usable)
    if backend not in usable:
        raise RuntimeError(f"backend={backend!r} is not available for {device.type} tensors on this machine "
                           f"for this op; available: {usable}")
    return backend


def _auto(device_type: str, usable: list[str]) -> str:
    # GPU: the fused Triton kernels (O(N) extra memory) first; no GPU measurement has been recorded
    # in benchmarks/results/ yet to rank `cuda` above them. CPU: the native row kernels first.
    order = ("triton", "cuda", "chunked") if device_type == "cuda" else ("cpp", "chunked")
    for backend in order:
        if backend in usable:
            return backend
    return "chunked"
