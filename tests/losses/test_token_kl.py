"""token_kl's three estimators against a per-element float64 re-derivation, values and gradients."""
import math

import pytest
import torch
from helpers import assert_close

from alignfast.losses import token_kl


def reference(logp, ref, estimator):
    out = []
    for a, b in zip(logp.flatten(), ref.flatten()):
        if estimator == "k1":
            out.append(a - b)
        elif estimator == "k2":
            out.append((a - b) ** 2 / 2)
        else:  # r − log r − 1 with r = π_ref/π
            r = torch.exp(b - a)
            out.append(r - torch.log(r) - 1)
    return torch.stack(out).view(logp.shape)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("shape", [(3, 7), (1, 1), (11,)], ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference(estimator, shape):
    g = torch.Generator().manual_seed(31 * sum(shape) + int(estimator[1]))
    logp = (-torch.rand(shape, generator=g, dtype=torch.float64) * 5).requires_grad_()
    ref = (logp.detach() + torch.randn(shape, generator=g, dtype=torch.float64) * 0.7).requires_grad_()
    ref.data.view(-1)[0] = logp.data.view(-1)[0]  # a tie: π = π_ref on one token
    weights = torch.randn(shape, generator=g, dtype=torch.float64)
    ours, expected = token_kl(logp, ref, estimator=estimator), reference(logp, ref, estimator)
    assert_close(ours, expected, rtol=1e-10, name=f"{estimator} value")
    for got, want, name in zip(torch.autograd.grad((ours * weights).sum(), (logp, ref)),
                               torch.autograd.grad((expected * weights).sum(), (logp, ref)), ("logp", "ref")):
        assert_close(got, want, rtol=1e-10, name=f"{estimator} d/d{name}")


def test_k2_k3_nonnegative_and_zero_at_tie():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.0, -0.1, -3.0])
    for est in ("k2", "k3"):
        kl = token_kl(logp, ref, estimator=est)
        assert (kl >= 0).all() and kl[0] == 0
    assert token_kl(logp, ref, estimator="k3")[1].item() == pytest.approx(math.exp(1.9) - 1.9 - 1, rel=1e-6)


def test_output_dtype_is_fp32_for_half_inputs():
    x = torch.randn(4, dtype=torch.bfloat16)
    assert token_kl(x, x.flip(0), estimator="k3").dtype == torch.float32


def test_validation():
    with pytest.raises(ValueError, match="estimator='k4'.*k1"):
        token_kl(torch.randn(3), torch.randn(3), estimator="k4")
    with pytest.raises(ValueError, match=r"ref_logprobs \(4,\).*logprobs \(3,\)"):
        token_kl(torch.randn(3), torch.randn(4))
