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
        grads = iter(ctx.saved_tensors)
        grads = [next(grads) if present else None for present in ctx.present]
        # The saved gradients are handed over: once this returns, autograd drops its reference to
        # them (the graph is freed), so each becomes the parameter's .grad, or is added to it, with
        # no [V, H]-sized copy; a scaled loss (loss / k, a trainer's scale) scales them in place.
        # A retained graph needs them again, unchanged: it gets copies.
        factor = float(grad_loss)
        if not _graph_is_freed():
            grads = [None if g is None else g * factor for g in grads]
        elif factor != 1.0:
            for g in grads:
                if g is not None:
                    g.mul_(factor)
        return (*grads, *([None] * (ctx.num_inputs - 3)))


def _graph_is_freed() -> bool:
    """Whether the running backward frees the graph (retain_graph=False). Unknown: assume it does not."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return keep_graph is not None and not keep_graph()
