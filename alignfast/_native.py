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
    _register_fakes()
    return _C


def _register_fakes() -> None:
    """Fake (meta) implementations of `_C`'s ops that no wrapper module owns, for torch.compile.
    (The row kernels' fakes live beside their wrapper, alignfast/ops/native_rows.py.)"""
    if hasattr(torch.ops.alignfast, "gae_scan"):
        @torch.library.register_fake("alignfast::gae_scan")
        def _gae_scan_fake(rewards, values, valid, gamma, lam):
            return torch.empty_like(rewards), torch.empty_like(rewards)

        no_derivative("alignfast::gae_scan", "alignfast.losses.gae (advantages are constants)")


def no_derivative(op: str, use: str) -> None:
    """Give `op` an autograd kernel whose backward raises. These ops are building blocks that the
    Python wrappers differentiate themselves; called directly on inputs that require grad, PyTorch
    would otherwise run the backward with only a warning and leave the inputs' gradients None."""
    def backward(ctx, *grads):
        raise RuntimeError(f"torch.ops.{op.replace('::', '.')} has no derivative: it is a building block "
                           f"of {use}; differentiate that instead")

    torch.library.register_autograd(op, backward, setup_context=lambda ctx, inputs, output: None)


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
