"""The other projects' adapters the benchmarks time compute the op they stand for: the value and the
gradients of each equal the naive op's on the same random float64 inputs, to float32 rounding (TRL
computes its tiles in float32); a wrong adapter is off by orders of magnitude more."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from benchmarks import third_party
from benchmarks.ops import OPS

CPU_ADAPTERS = [(op, impl) for op, spec in OPS.items() for impl in spec.third_party
                if impl in ("trl", "liger") and not (op != "dpo" and impl == "liger")]   # Liger's CE is Triton


@pytest.mark.parametrize("op,impl", CPU_ADAPTERS)
def test_adapter_matches_naive(op, impl, monkeypatch):
    if importlib.util.find_spec(third_party.PACKAGES[impl]) is None:
        pytest.skip(f"{third_party.PACKAGES[impl]} is not installed")
    monkeypatch.setattr(third_party, "LIGER_COMPILED", False)
    spec = OPS[op]
    results = []
    for forward in (spec.naive, spec.third_party[impl]):
        inputs = spec.make_inputs(64, 16, 300, torch.float64, torch.device("cpu"), seed=3)
        out = forward(**inputs.args)
        (out if out.ndim == 0 else (out * inputs.upstream).sum()).backward()
        results.append([out.detach(), *(p.grad for p in inputs.params)])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
