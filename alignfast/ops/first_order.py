"""`first_order`: the backward decorator of every fused autograd.Function.

The fused backwards return gradients computed from saved blocks (or in the forward) without an
autograd graph of their own, so a second derivative through them would silently miss the op's own
term. PyTorch's `once_differentiable` catches that only when an incoming gradient requires grad,
which the usual constant upstream never does (and its deferred error never fires when the graph
asked for leads to the inputs, not to the returned gradients). So a backward asked to build a graph
(`create_graph=True`) raises at once; a plain backward runs unchanged, without grad mode.
"""
from __future__ import annotations

import functools

import torch

MESSAGE = ("alignfast's fused ops compute first-order gradients only: their backward cannot build a graph "
           "(create_graph=True: Hessian-vector products, gradient penalties through the loss). Use "
           "backend='reference' (materialised logits) for higher-order gradients")


def first_order(backward):
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(MESSAGE)
        return backward(ctx, *grads)

    return wrapper
