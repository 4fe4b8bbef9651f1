"""The fused backwards are first-order only: asking them for a graph (create_graph=True) raises a
clear error instead of returning gradients that silently miss the op's second-order term; the
native building-block ops raise when differentiated directly instead of leaving gradients None."""
import pytest
import torch

import alignfast
from alignfast.losses import LinearSFTLoss
from alignfast.losses.pg_token import TokenLossOptions, pg_token_terms

FUSED = [b for b in alignfast.backends("cpu") if b != "reference"]
FIRST_ORDER = "first-order gradients only"


def _inputs(seed=0, n=12, h=8, v=40):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, targets


REF_WEIGHT = torch.randn(40, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
OPS = {
    "logprobs": lambda h, w, t, b: alignfast.linear_logprobs(h, w, t, backend=b).logprobs.sum(),
    "cross_entropy_mean": lambda h, w, t, b: alignfast.linear_cross_entropy(h, w, t, backend=b),
    "cross_entropy_none": lambda h, w, t, b: alignfast.linear_cross_entropy(h, w, t, reduction="none",
                                                                           backend=b).sum(),
    "kl_sum": lambda h, w, t, b: alignfast.linear_kl(h, w, h.detach() * 0.5, REF_WEIGHT, reduction="sum",
                                                        backend=b),
    "kl_none": lambda h, w, t, b: alignfast.linear_kl(h, w, h.detach() * 0.5, REF_WEIGHT, backend=b).sum(),
    "sft_loss": lambda h, w, t, b: LinearSFTLoss(backend=b)(h[None], w, t[None])[0],
}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend", FUSED)
def test_create_graph_raises(op, backend):
    hidden, weight, targets = _inputs()
    loss = OPS[op](hidden, weight, targets, backend)
    with pytest.raises(RuntimeError, match=FIRST_ORDER):
        torch.autograd.grad(loss, weight, create_graph=True)


@pytest.mark.parametrize("op", list(OPS))
def test_reference_backend_gives_the_hessian_vector_product(op):
    """What the message points to works: the reference's HVP equals a finite difference of its gradient."""
    hidden, weight, targets = _inputs(1)
    (grad,) = torch.autograd.grad(OPS[op](hidden, weight, targets, "reference"), weight, create_graph=True)
    v = torch.randn(weight.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (hvp,) = torch.autograd.grad((grad * v).sum(), weight)
    eps = 1e-6
    grads = []
    for s in (1, -1):
        w = (weight.detach() + s * eps * v).requires_grad_()
        grads.append(torch.autograd.grad(OPS[op](hidden.detach(), w, targets, "reference"), w)[0])
    torch.testing.assert_close(hvp, (grads[0] - grads[1]) / (2 * eps), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", [b for b in ("cpp", "triton") if b in FUSED])
def test_pg_token_pass_create_graph_raises(backend):
    g = torch.Generator().manual_seed(3)
    logp = torch.randn(2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    old, adv, mask = torch.randn(2, 5, generator=g, dtype=torch.float64), torch.randn(2, dtype=torch.float64), \
        torch.ones(2, 5)
    terms = pg_token_terms(logp, old, None, adv, mask, TokenLossOptions(ratio_low=0.8, ratio_high=1.2, backend=backend))
    with pytest.raises(RuntimeError, match=FIRST_ORDER):
        torch.autograd.grad(terms.loss.sum(), logp, create_graph=True)


@pytest.mark.skipif("cpp" not in FUSED, reason="alignfast._C not built")
def test_native_ops_called_directly_refuse_backward():
    z = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    logprob, _, _, _ = torch.ops.alignfast.logprob_rows_stats(z, torch.tensor([1, 2, 3, 4]), 1.0, None, False, False)
    with pytest.raises(RuntimeError, match="logprob_rows_stats has no derivative.*linear_logprobs"):
        logprob.sum().backward()
    kl, _, _ = torch.ops.alignfast.kl_rows_stats(z, torch.randn(4, 10, dtype=torch.float64), 1.0, False)
    with pytest.raises(RuntimeError, match="kl_rows_stats has no derivative.*linear_kl"):
        kl.sum().backward()
    assert z.grad is None


# ---- gradients formed in the forward: handed over, scaled in place ----------------------------
def _big_allocations_in_backward(loss, nbytes):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss.backward()
    return [e.name for e in prof.events() if e.name.startswith("aten::") and e.cpu_memory_usage >= nbytes]


@pytest.mark.parametrize("backend", [b for b in ("chunked", "cpp") if b in FUSED])
def test_a_scaled_fused_loss_hands_its_gradient_over_without_a_copy(backend):
    """loss / k (gradient accumulation, a trainer's scale) made a [V, H] copy of the saved gradient."""
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(32, 64, generator=g, requires_grad=True)
    weight = torch.randn(2000, 64, generator=g, requires_grad=True)
    targets = torch.randint(0, 2000, (32,), generator=g)
    loss = alignfast.linear_cross_entropy(hidden, weight, targets, backend=backend)
    expected = torch.autograd.grad(loss, weight, retain_graph=True)[0] * 0.25
    assert _big_allocations_in_backward(loss * 0.25, weight.numel() * 4) == []
    assert torch.equal(weight.grad, expected)


@pytest.mark.parametrize("scales", [(2.5, 0.5), (1.0, 3.0), (0.0, 2.0)])
def test_a_retained_graph_backpropagated_again_gets_each_scale(scales):
    """With retain_graph the saved gradients stay untouched (a retained backward gets copies), so the
    last backward's in-place scaling cannot reach what an earlier one returned."""
    hidden, weight, targets = _inputs(5)
    loss = alignfast.linear_cross_entropy(hidden, weight, targets, backend="chunked")
    unit = torch.autograd.grad(alignfast.linear_cross_entropy(hidden, weight, targets, backend="reference"),
                               (hidden, weight))
    first = torch.autograd.grad(loss * scales[0], (hidden, weight), retain_graph=True)
    second = torch.autograd.grad(loss * scales[1], (hidden, weight))
    for got_first, got, u in zip(first, second, unit):
        torch.testing.assert_close(got_first, u * scales[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got, u * scales[1], rtol=1e-12, atol=1e-14)
