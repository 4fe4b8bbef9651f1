"""Triton kernels and their launchers (`alignfast.kernels`).

No autograd and no torch.nn here: `alignfast.ops` wraps these launchers.
"""
