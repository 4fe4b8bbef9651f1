"""Loads the compiled extension `alignfast._C` when it was built; absent is fine."""
from __future__ import annotations

import functools
import warnings

import torch

# The op whose registration for a device means "the native row kernels are there".
ROW_KERNEL_OP = "alignfast::logprob_rows_stats"


@functools.lru_cache(maxsize=None)
def extension():
    """The `alignfast._C` module, or None when the native build was skipped or failed."""
    try:
        from alignfast import _C
    except ImportError as err:
        if "No module named" not in str(err):
            warnings.warn(f"alignfast._C is present but failed to load ({err}); using Python backends")
        return None
    return _C


def has_kernels(device_type: str) -> bool:
    """Whether `alignfast._C` registered the row kernels for this device type."""
    if extension() is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(ROW_KERNEL_OP, key)
    except RuntimeError:  # the extension predates the op: no row kernels registered
        return False
