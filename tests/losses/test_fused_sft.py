"""LinearSFTLoss against F.cross_entropy on materialised float64 logits; the fused base's
projection count and its fallbacks."""
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

import alignfast.ops.chunked as chunked
from alignfast.losses.fused_sft import LinearSFTLoss


def make_inputs(dtype, *, b=3, t=7, h=12, v=61, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5
    bias = torch.randn(v, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[-1, -2:] = -100  # padding
    return [x.to(dtype).requires_grad_() for x in (hidden, weight, bias)], labels


def expected(hidden, weight, bias, labels, reduction, temperature, softcap):
    logits = hidden.double() @ weight.double().t() + bias.double()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy((logits / temperature).flatten(0, 1), labels.flatten(), reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("backend", ["chunked", "reference"])
@pytest.mark.parametrize("case", [dict(chunk_size=4), dict(chunk_size=5, reduction="sum", temperature=0.7),
                                  dict(chunk_size=None, softcap=2.5)], ids=["mean-c4", "sum-T-c5", "softcap-c∞"])
def test_matches_cross_entropy(backend, dtype, case, poison_empty):
    reduction = case.get("reduction", "mean")
    leaves, labels = make_inputs(dtype)
    module = LinearSFTLoss(backend=backend, log_entropy=True, **case)
    loss, metrics = module(*leaves[:2], labels, leaves[2])
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ref = expected(*ref_leaves, labels, reduction, case.get("temperature", 1.0), case.get("softcap"))
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_close(loss, ref, rtol=rtol, name="loss")
    for got, want, name in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(ref, ref_leaves),
                               ("hidden", "weight", "bias")):
        assert_close(got, want, rtol=rtol, name=name)
    assert metrics["num_tokens"].item() == int((labels != -100).sum())


class ProjectionCounter:
    """Counts the [rows, V]-sized products of the chunked driver: logits blocks, grad_hidden, grad_weight."""

    def __init__(self, monkeypatch):
        self.blocks = self.products = 0
        real_block, real_mm, real_addmm_ = chunked.logits_block, torch.mm, torch.Tensor.addmm_

        def block(*a, **k):
            self.blocks += 1
            return real_block(*a, **k)

        def mm(*a, **k):
            self.products += 1
            return real_mm(*a, **k)

        def addmm_(*a, **k):
            self.products += 1
            return real_addmm_(*a, **k)

        monkeypatch.setattr(chunked, "logits_block", block)
        monkeypatch.setattr(torch, "mm", mm)
        monkeypatch.setattr(torch.Tensor, "addmm_", addmm_)


def test_three_projections(monkeypatch):
    leaves, labels = make_inputs(torch.float64, b=4, t=9)
    counter = ProjectionCounter(monkeypatch)
    loss, _ = LinearSFTLoss(backend="chunked", chunk_size=5)(*leaves[:2], labels, leaves[2])
    n_chunks = -(-int((labels != -100).sum()) // 5)
    assert counter.blocks == n_chunks  # the forward computes the gradient too
    loss.backward()
    assert counter.blocks == n_chunks  # ... and the backward only scales it
    # the logits blocks use addmm (bias); each chunk adds grad_hidden (mm) and grad_weight (addmm_)
    assert counter.products == 2 * n_chunks


def test_no_grad_one_projection(monkeypatch):
    leaves, labels = make_inputs(torch.float64)
    counter = ProjectionCounter(monkeypatch)
    with torch.no_grad():
        LinearSFTLoss(backend="chunked", chunk_size=4)(*leaves[:2], labels, leaves[2])
    assert counter.blocks == -(-int((labels != -100).sum()) // 4) and counter.products == 0


def test_all_ignored_is_zero():
    leaves, labels = make_inputs(torch.float64)
    labels[:] = -100
    loss, metrics = LinearSFTLoss(backend="chunked", chunk_size=4)(*leaves[:2], labels, leaves[2])
    loss.backward()
    assert loss.item() == 0.0 and metrics["num_tokens"].item() == 0
    assert leaves[0].grad.abs().max().item() == 0.0


def test_bad_shapes():
    leaves, labels = make_inputs(torch.float64)
    with pytest.raises(ValueError, match="labels"):
        LinearSFTLoss()(leaves[0], leaves[1], labels[:, :-1])
    with pytest.raises(ValueError, match="reduction"):
        LinearSFTLoss(reduction="none")
