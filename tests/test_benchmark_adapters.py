"""The other projects' adapters the benchmarks time compute the op they stand for, and so does alignfast's
fused impl: the value and the gradients of each equal the naive op's on the same random float64 inputs,
to float32 rounding (naive casts its logits to float32, TRL computes its tiles in float32); a wrong
adapter is off by orders of magnitude more."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from benchmarks import third_party
from benchmarks.ops import OPS

# every adapter that runs on a CPU: Liger's cross-entropy is Triton, its chunked losses are torch
CPU_ADAPTERS = [(op, impl) for op, spec in OPS.items() for impl in spec.third_party
                if impl == "trl" or (impl == "liger" and op != "linear_cross_entropy")]
# alignfast's fused op, where it is exact (grad_filter_eps skips small gradients by design)
FUSED = [(op, backend) for op in OPS if op != "cross_entropy_filtered"
         for backend in ("chunked", "reference")]


def _run(forward, spec) -> list:
    """The output and the gradients of one fwd+bwd of `forward` on the op's float64 inputs."""
    inputs = spec.make_inputs(64, 16, 300, torch.float64, torch.device("cpu"), seed=3)
    out = forward(**inputs.args)
    (out if out.ndim == 0 else (out * inputs.upstream).sum()).backward()
    return [out.detach(), *(p.grad for p in inputs.params)]


def _assert_matches_naive(spec, forward, check_dtype=True) -> None:
    want, got = _run(spec.naive, spec), _run(forward, spec)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, check_dtype=check_dtype)


@pytest.mark.parametrize("op,impl", CPU_ADAPTERS)
def test_adapter_matches_naive(op, impl, monkeypatch):
    if importlib.util.find_spec(third_party.PACKAGES[impl]) is None:
        pytest.skip(f"{third_party.PACKAGES[impl]} is not installed")
    monkeypatch.setattr(third_party, "LIGER_COMPILED", False)
    _assert_matches_naive(OPS[op], OPS[op].third_party[impl])


@pytest.mark.parametrize("op,backend", FUSED)
def test_fused_matches_naive(op, backend):
    spec = OPS[op]
    # alignfast's float64 output against naive's float32 one (its .float() of float64 logits)
    _assert_matches_naive(spec, lambda **args: spec.fused(**args, backend=backend), check_dtype=False)
