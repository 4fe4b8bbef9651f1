"""Implementations ("impl" column): how each turns an op and its inputs into one fwd+bwd `Step`.

| impl            | what it runs                                                              |
| --------------- | ------------------------------------------------------------------------- |
| `naive`         | the op's PyTorch eager function on materialised [N, V] logits              |
| `floor`         | only the op's [N,H]x[H,V]-sized matmuls (`OpSpec.floor_matmuls`), no softmax |
| `chunked` `cpp` `triton` `cuda` | alignfast with that backend                                |
| `torch_compile` | `torch.compile` of the naive function (compile time excluded by warmup)   |
| `liger` `trl` `cce` | Liger-Kernel, TRL, Cut Cross-Entropy (`benchmarks.third_party`)       |
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

import alignfast
from benchmarks import third_party
from benchmarks.ops import Inputs, OpSpec

ALIGNFAST_BACKENDS = ("chunked", "cpp", "triton", "cuda")
DEVICE_TYPES = {"cpp": ("cpu",), "triton": ("cuda",), "cuda": ("cuda",), "liger": ("cuda",), "cce": ("cuda",)}
# impls whose failure to run is recorded as "skipped: reason" (other projects, the compiler);
# any other impl that raises is an error of this project
OPTIONAL = ("torch_compile", *third_party.PACKAGES)


@dataclass
class Step:
    run: Callable[[], list]        # one fwd+bwd; returns the outputs and gradients it produced
    reset: Callable[[], None]      # before each round, outside timing: drop the gradients
    workspace_bytes: int = 0       # buffers the impl allocated up front (counted as extra memory)
    compile_warmup: bool = False   # the first call compiles: one more warmup round


def unavailable(impl: str, op: OpSpec, device_type: str) -> str | None:
    """Why `impl` cannot run `op` here (cheap checks, no import of other projects), or None.

    Devices a project could run on are not ruled out here: its failure at run time is the reason
    recorded (e.g. Liger on CPU).
    """
    if impl in ALIGNFAST_BACKENDS:
        if device_type not in DEVICE_TYPES.get(impl, (device_type,)):
            return f"alignfast backend {impl!r} is not for {device_type}"
        if impl not in alignfast.backends():
            return f"alignfast backend {impl!r} not available here (backends: {alignfast.backends()})"
    elif impl in third_party.PACKAGES:
        if impl not in op.third_party:
            return f"{impl} has no implementation of this op"
        if importlib.util.find_spec(third_party.PACKAGES[impl]) is None:
            return f"{third_party.PACKAGES[impl]} is not installed"
    elif impl not in ("naive", "floor", "torch_compile"):
        return f"unknown impl {impl!r}"
    return None


def build(impl: str, op: OpSpec, inputs: Inputs) -> Step:
    if impl == "floor":
        return _floor_step(op, inputs)
    if impl == "naive":
        return _autograd_step(op.naive, inputs)
    if impl == "torch_compile":
        return _autograd_step(torch.compile(op.naive, dynamic=False), inputs, compile_warmup=True)
    if impl in ALIGNFAST_BACKENDS:
        return _autograd_step(lambda **kw: op.fused(**kw, backend=impl), inputs)
    return _autograd_step(op.third_party[impl], inputs)


def _autograd_step(forward: Callable, inputs: Inputs, compile_warmup: bool = False) -> Step:
    def run() -> list:
        out = forward(**inputs.args)
        loss = out if out.ndim == 0 else (out * inputs.upstream).sum()
        loss.backward()
        return [out.detach(), *(p.grad for p in inputs.params)]

    return Step(run, inputs.reset_grads, compile_warmup=compile_warmup)


def _floor_step(op: OpSpec, inputs: Inputs) -> Step:
    """logits = h @ W.T (once, or twice with a recompute), grad_h = G @ W, grad_W = G.T @ h.

    G reuses the logits buffer: the floor is the matmul time, with no softmax and no allocation of
    [N, V] inside the timed region (its buffer is counted as workspace memory).
    """
    hidden, weight = inputs.args["hidden"], inputs.args["weight"]
    logits = hidden.new_empty(hidden.shape[0], weight.shape[0])

    def run() -> list:
        with torch.no_grad():
            for _ in range(op.floor_matmuls - 2):
                torch.mm(hidden, weight.t(), out=logits)
            return [torch.mm(logits, weight), torch.mm(logits.t(), hidden)]

    return Step(run, inputs.reset_grads, workspace_bytes=logits.nbytes)
