"""linear_cross_entropy against torch.nn.functional.cross_entropy on materialised float64 logits."""
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

import alignfast

BACKENDS = [b for b in alignfast.backends("cpu")]


def expected_loss(hidden, weight, bias, targets, *, reduction, label_smoothing, z_loss, softcap, temperature):
    """Independent float64 oracle: materialise logits, F.cross_entropy, PaLM's z-loss."""
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / temperature
    losses = F.cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing)
    valid = targets != -100
    losses = losses + z_loss * torch.logsumexp(logits, -1).square() * valid
    if reduction == "none":
        return losses
    total = losses.sum()
    return total / max(int(valid.sum()), 1) if reduction == "mean" else total


SETTINGS = {
    "plain": dict(),
    "smoothing": dict(label_smoothing=0.1),
    "zloss": dict(z_loss=1e-3),
    "softcap-T-all": dict(label_smoothing=0.2, z_loss=1e-4, softcap=3.0, temperature=0.8),
}


@pytest.mark.parametrize("setting", list(SETTINGS), ids=list(SETTINGS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch_cross_entropy(backend, reduction, setting, poison_empty):
    kw = dict(label_smoothing=0.0, z_loss=0.0, softcap=None, temperature=1.0) | SETTINGS[setting]
    g = torch.Generator().manual_seed(1)
    n, h, v = 33, 24, 1001
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5
    bias = torch.randn(v, generator=g, dtype=torch.float64)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::4] = -100
    dtype = torch.float64 if backend in ("reference", "chunked", "cpp") else torch.float32
    leaves = [t.to(dtype).requires_grad_() for t in (hidden, weight, bias)]
    ref_leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    upstream = torch.randn(n, generator=g, dtype=torch.float64) if reduction == "none" else torch.tensor(1.7,
                                                                                                          dtype=torch.float64)

    loss = alignfast.linear_cross_entropy(*leaves[:2], targets, leaves[2], reduction=reduction, backend=backend,
                                          chunk_size=7, **kw)
    ref = expected_loss(*ref_leaves, targets, reduction=reduction, **kw)
    grads = torch.autograd.grad((loss.double() * upstream).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), ref_leaves)
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    assert loss.shape == ref.shape
    assert_close(loss, ref, rtol=rtol, name="loss")
    for name, a, e in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, ref_grads):
        assert a.dtype == dtype
        assert_close(a, e, rtol=rtol, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_and_3d_input(backend):
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 9, 16, generator=g)
    weight = torch.randn(500, 16, generator=g) / 4
    targets = torch.randint(0, 500, (2, 9), generator=g)
    hidden.requires_grad_()
    loss = alignfast.linear_cross_entropy(hidden, weight, targets, backend=backend)
    assert loss.dtype == torch.float32 and loss.shape == ()
    loss.backward()
    ref_h = hidden.detach().double().requires_grad_()
    ref = expected_loss(ref_h.view(-1, 16), weight, None, targets.view(-1), reduction="mean", label_smoothing=0.0,
                        z_loss=0.0, softcap=None, temperature=1.0)
    ref.backward()
    assert_close(loss, ref, rtol=1e-5)
    assert_close(hidden.grad, ref_h.grad, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_gives_zero_loss_and_zero_grads(backend):
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    targets = torch.full((6,), -100)
    loss = alignfast.linear_cross_entropy(hidden, weight, targets, backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    assert not hidden.grad.isnan().any() and (hidden.grad == 0).all()
    assert weight.grad is None or (weight.grad == 0).all()


def test_no_grad_and_eval_paths_agree():
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(20, 8, generator=g), torch.randn(300, 8, generator=g)
    targets = torch.randint(0, 300, (20,), generator=g)
    with torch.no_grad():
        a = alignfast.linear_cross_entropy(hidden, weight, targets, backend="chunked")
    b = alignfast.linear_cross_entropy(hidden.requires_grad_(), weight, targets, backend="chunked")
    assert_close(a, b.detach(), rtol=1e-6)


def test_bad_arguments():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="reduction"):
        alignfast.linear_cross_entropy(h, w, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        alignfast.linear_cross_entropy(h, w, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="z_loss"):
        alignfast.linear_cross_entropy(h, w, t, z_loss=-1.0)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_gradient_from_the_forward_survives_retain_graph(scale):
    """The backward hands over (or scales) gradients saved in the forward: a second backward through
    the same graph must add the same gradient again, not a modified one."""
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(12, 8, generator=g, requires_grad=True)
    weight = torch.randn(40, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 40, (12,), generator=g)
    loss = alignfast.linear_cross_entropy(hidden, weight, targets, backend="chunked") * scale
    loss.backward(retain_graph=True)
    first = hidden.grad.clone(), weight.grad.clone()
    loss.backward()
    assert_close(hidden.grad, 2 * first[0], rtol=1e-6)
    assert_close(weight.grad, 2 * first[1], rtol=1e-6)
    ref_h, ref_w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    (F.cross_entropy(ref_h @ ref_w.t(), targets) * scale).backward()
    assert_close(first[0], ref_h.grad, rtol=1e-5)
    assert_close(first[1], ref_w.grad, rtol=1e-5)


def test_low_precision_weight_gradient_products_accumulate_in_fp32(monkeypatch):
    """Where a GPU multiplies bf16 into fp32 (`chunked.low_precision_products`), grad_weight's product
    takes dz in bf16 and accumulates every chunk in fp32 (an fp32 GEMM there ran several times slower).
    Here the out_dtype products are emulated on the CPU, to check the chunks' first write and adds."""
    from alignfast.ops import chunked

    calls = []
    real_mm, real_addmm = torch.mm, torch.addmm

    def mm(a, b, *, out_dtype=None, out=None):
        if out_dtype is None:
            return real_mm(a, b, out=out) if out is not None else real_mm(a, b)
        calls.append("mm")
        assert a.dtype == b.dtype == torch.bfloat16 and out.dtype == out_dtype == torch.float32
        return out.copy_(real_mm(a.float(), b.float()))

    def addmm(c, a, b, *, out_dtype=None, out=None, **kw):
        if out_dtype is None:
            return real_addmm(c, a, b, out=out, **kw) if out is not None else real_addmm(c, a, b, **kw)
        calls.append("addmm")
        assert a.dtype == b.dtype == torch.bfloat16 and out is c and out.dtype == torch.float32
        return out.add_(real_mm(a.float(), b.float()))

    monkeypatch.setattr(chunked, "low_precision_products", lambda device: True)
    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(torch, "addmm", addmm)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64) / 4
    targets = torch.randint(0, 50, (40,), generator=g)
    h, w = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    alignfast.linear_cross_entropy(h, w, targets, backend="chunked", chunk_size=16).backward()
    assert calls == ["mm", "addmm", "addmm"]  # 3 token chunks: written once, then added
    w64 = weight.clone().requires_grad_()
    torch.nn.functional.cross_entropy(hidden @ w64.t(), targets).backward()
    assert_close(w.grad.double(), w64.grad, rtol=0, atol=2e-2 * w64.grad.abs().max().item(), name="grad_weight")
