"""Triton launches on the device of their tensors.

Triton launches on the *current* CUDA device; tensors on another one (`cuda:1` under a model split
across GPUs with `device_map="auto"`) would be read from the wrong device or refused. Every launcher
of this package runs under its first tensor's device, as the C++ ops do with a device guard.
"""
from __future__ import annotations

import contextlib
import functools

import torch


def on_tensor_device(launcher):
    """`launcher(first_tensor, ...)` run with `first_tensor`'s CUDA device current (no-op off CUDA)."""
    @functools.wraps(launcher)
    def launch(first: torch.Tensor, *args, **kwargs):
        context = torch.cuda.device(first.device) if first.is_cuda else contextlib.nullcontext()
        with context:
            return launcher(first, *args, **kwargs)
    return launch
