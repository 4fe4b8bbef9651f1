"""Triton kernels and their launchers, installed as `alignfast.kernels` (never as `kernels`).

No autograd and no torch.nn here: `alignfast.ops` wraps these launchers.
"""
