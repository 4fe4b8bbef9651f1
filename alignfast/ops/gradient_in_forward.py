"""Autograd for a scalar loss whose gradient the forward already computed.

When every token's upstream gradient is known in the forward (a mean/sum cross-entropy, a
fused alignment loss over whole sequences), the chunked backends form grad_hidden, grad_weight
and grad_bias in the same sweep as the loss (3 vocab projections instead of 4). Their Function
saves those gradients and the backward only scales them by the incoming scalar gradient.
"""
from __future__ import annotations

import torch
from alignfast.ops.first_order import first_order


class GradientInForward(torch.autograd.Function):
    """Base: forward(ctx, hidden, weight, bias, ...) calls `save_gradients(ctx, grads)`; the first three
    inputs get the saved gradients × grad_loss, every other input None."""

    @staticmethod
    def save_gradients(ctx, grads) -> None:
        ctx.save_for_backward(*(g for g in grads if g is not None))
        ctx.present = [g is not None for g in grads]

    @staticmethod
    @first_order
    def backward(ctx, grad_loss):
        saved = iter(ctx.saved_tensors)
        # loss.backward() passes exactly 1: hand the saved gradients over without a [V, H]-sized multiply.
        unit = bool(grad_loss == 1)
        grads = [None if not present else (g if unit else g * grad_loss.to(g.dtype))
                 for present, g in ((p, next(saved) if p else None) for p in ctx.present)]
        return (*grads, *([None] * (ctx.num_inputs - 3)))
