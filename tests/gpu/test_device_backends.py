"""Every backend of this machine's accelerator, on its own device, against float64 naive computations
on the CPU: `linear_logprobs` (any upstream gradient, entropy, lse), `linear_cross_entropy`,
`linear_kl` and the fused DPO and PPO losses, fp32 and bf16, odd shapes, values and gradients.

The other test modules run on CPU tensors; this one is what `benchmarks/gpu_check.sh` needs from a
GPU: the `cuda` and `triton` backends on CUDA tensors (at a larger size there). On a machine without
CUDA it runs the same checks on the CPU's backends, so the checks themselves run in every CI.
"""
from __future__ import annotations

import os

import pytest
import torch
from helpers import assert_close, max_err

import alignfast
from alignfast.losses import LinearDPOLoss, LinearPPOLoss, dpo_loss, ppo_policy_loss
from alignfast.ops.kl import kl_backends

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [b for b in alignfast.backends(DEVICE) if b != "reference"]
KL_BACKENDS = [b for b in BACKENDS if b in kl_backends()]
# tokens, hidden, vocab (none a multiple of a tile): larger on a GPU
N, H, V = (1031, 256, 32011) if DEVICE == "cuda" else (67, 24, 1037)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def tensors(*shapes, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64) * scale for s in shapes]


def head(seed, v=V):
    """hidden [N, H], weight [V, H] (logits of std ~2), bias [V], float64 on the CPU."""
    hidden, weight, bias = tensors((N, H), (v, H), (v,), seed=seed)
    return hidden, weight * 2 / H**0.5, bias


def on_device(dtype, *xs):
    """Copies on DEVICE in `dtype`, as leaves that want a gradient."""
    return [x.to(DEVICE, dtype).requires_grad_() for x in xs]


def grads(out, leaves):
    return torch.autograd.grad(out, leaves)


def tolerance(dtype, got, exact, naive_low):
    """fp32: 1e-5 of the scale; bf16: twice the error of the naive bf16 computation (+ 1e-3 of the scale)."""
    scale = exact.abs().max().item()
    if dtype == torch.float32:
        return 1e-5 * max(scale, 1e-12)
    return 2 * max_err(naive_low, exact) + 1e-3 * scale


def naive_logits(hidden, weight, bias, dtype):
    """hidden @ weight.T + bias as a user writes it in `dtype` (the matmul in that dtype), then float64."""
    return (hidden.to(dtype) @ weight.to(dtype).t() + bias.to(dtype)).double()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_at_large_tempered_logits(backend):
    """T = 0.05 on logits whose rows are one-hot after tempering (top-2 gaps > 15 in z/T): p is one-hot to
    fp32 rounding, so ∂(lse − ½·logprob)/∂hidden is exact only if every pass forms the same z/T. With z/T
    fused into an FMA in the grad pass but rounded in the statistics, p at the argmax came out ~1.03 (cpp;
    the CUDA and Triton kernels are compiled with FMA contraction too)."""
    hidden, weight, _ = tensors((N, H), (V, H), (V,), seed=5)
    hidden, weight = hidden * 30, weight * 30 / H**0.5   # z/T ~ 1e4: a half ulp of z/T is ~1e-3
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(6))
    h, w = on_device(torch.float32, hidden, weight)
    out = alignfast.linear_logprobs(h, w, targets.to(DEVICE), temperature=0.05, return_lse=True, backend=backend)
    got = grads((out.lse - 0.5 * out.logprobs).sum(), [h, w])  # (equal weights would cancel p's term)
    h64, w64 = hidden.float().double().requires_grad_(), weight.float().double().requires_grad_()
    x = (h64 @ w64.t()) / 0.05
    top2 = x.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 15  # one-hot rows, to fp32 rounding (e^-15 = 3e-7)
    logprob = x.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(x, -1)
    want = grads((torch.logsumexp(x, -1) - 0.5 * logprob).sum(), [h64, w64])
    for name, a, e in zip(("grad_hidden", "grad_weight"), got, want):
        assert_close(a.cpu(), e, rtol=1e-5, atol=1e-5 * e.abs().max().item(), name=name)


@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])  # the kernels' own tanh
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs(backend, dtype, softcap):
    dt = DTYPES[dtype]
    hidden, weight, bias = head(seed=1)
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2))
    targets[::7] = -100
    g_lp, g_ent = tensors((N,), (N,), seed=3)
    valid = targets != -100

    def naive(h, w, b, low=torch.float64):
        x = naive_logits(h, w, b, low)
        x = (x if softcap is None else softcap * torch.tanh(x / softcap)) / 0.9
        logp = x.log_softmax(-1)
        lp = torch.where(valid, logp.gather(-1, targets.clamp(min=0)[:, None])[:, 0], 0.0)
        ent = torch.where(valid, -(logp.exp() * logp).sum(-1), 0.0)
        return lp, ent, torch.where(valid, x.logsumexp(-1), 0.0)

    def run_naive(low):
        leaves = [t.to(low).requires_grad_() for t in (hidden, weight, bias)]
        out = naive(*leaves, low=low)
        return out, grads((out[0] * g_lp).sum() + (out[1] * g_ent).sum(), leaves)

    (exact, exact_grads), (low, low_grads) = run_naive(torch.float64), run_naive(dt)

    leaves = on_device(dt, hidden, weight, bias)
    out = alignfast.linear_logprobs(leaves[0], leaves[1], targets.to(DEVICE), leaves[2], temperature=0.9,
                                    softcap=softcap, return_entropy=True, return_lse=True, backend=backend)
    got_grads = grads((out.logprobs * g_lp.to(DEVICE)).sum() + (out.entropy * g_ent.to(DEVICE)).sum(), leaves)
    for name, a, e, n in zip(("logprobs", "entropy", "lse"), out, exact, low):
        assert a.dtype == torch.float32 and a.device.type == DEVICE, name
        assert_close(a, e, rtol=0, atol=tolerance(dt, a, e, n), name=name)
    for name, a, e, n in zip(("grad_hidden", "grad_weight", "grad_bias"), got_grads, exact_grads, low_grads):
        assert a.dtype == dt, name
        assert_close(a, e, rtol=0, atol=tolerance(dt, a, e, n), name=name)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy(backend, dtype):
    dt = DTYPES[dtype]
    hidden, weight, bias = head(seed=4)
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(5))
    targets[3::11] = -100
    def run_naive(low):
        leaves = [t.to(low).requires_grad_() for t in (hidden, weight, bias)]
        loss = torch.nn.functional.cross_entropy(naive_logits(*leaves, low), targets, label_smoothing=0.1)
        return loss, grads(loss, leaves)

    (exact, exact_grads), (low, low_grads) = run_naive(torch.float64), run_naive(dt)
    leaves = on_device(dt, hidden, weight, bias)
    loss = alignfast.linear_cross_entropy(leaves[0], leaves[1], targets.to(DEVICE), leaves[2], label_smoothing=0.1,
                                          backend=backend)
    assert_close(loss, exact, rtol=0, atol=tolerance(dt, loss, exact, low), name="loss")
    for name, a, e, n in zip(("grad_hidden", "grad_weight", "grad_bias"), grads(loss, leaves), exact_grads,
                             low_grads):
        assert_close(a, e, rtol=0, atol=tolerance(dt, a, e, n), name=name)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("backend", KL_BACKENDS)
def test_linear_kl(backend, reverse):
    hidden, weight, bias = head(seed=6)
    ref_hidden, ref_weight = tensors((N, H + 8), (V, H + 8), seed=7)
    ref_weight = ref_weight * 2 / (H + 8) ** 0.5
    g = tensors((N,), seed=8)[0]
    leaves64 = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    logp = naive_logits(*leaves64, torch.float64).log_softmax(-1)
    logq = (ref_hidden @ ref_weight.t()).log_softmax(-1)
    exact = (logq.exp() * (logq - logp)).sum(-1) if reverse else (logp.exp() * (logp - logq)).sum(-1)
    exact_grads = grads((exact * g).sum(), leaves64)
    leaves = on_device(torch.float32, hidden, weight, bias)
    kl = alignfast.linear_kl(leaves[0], leaves[1], ref_hidden.to(DEVICE, torch.float32),
                             ref_weight.to(DEVICE, torch.float32), bias=leaves[2], reverse=reverse, backend=backend)
    assert_close(kl, exact, rtol=1e-5, name="kl")
    for name, a, e in zip(("grad_hidden", "grad_weight", "grad_bias"), grads((kl * g.to(DEVICE)).sum(), leaves),
                          exact_grads):
        assert_close(a, e, rtol=1e-5, name=name)


def sequences(seed, batch=4):
    """[B, T, H] policy and reference hidden states, [V, H] heads, labels with prompts ignored."""
    t = max(N // batch, 2)
    hidden, ref_hidden, weight, ref_weight = tensors((batch, t, H), (batch, t, H), (V, H), (V, H), seed=seed)
    weight, ref_weight = weight * 2 / H**0.5, ref_weight * 2 / H**0.5
    labels = torch.randint(0, V, (batch, t), generator=torch.Generator().manual_seed(seed + 1))
    labels[:, : t // 4] = -100
    return hidden, weight, ref_hidden, ref_weight, labels


def token_logps(hidden, weight, labels):
    """[B, T] float64 log-probs of the labels, 0 where ignored."""
    logp = (hidden @ weight.t()).log_softmax(-1)
    lp = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return torch.where(labels != -100, lp, 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_dpo(backend):
    hidden, weight, ref_hidden, ref_weight, labels = sequences(seed=9)
    leaves64 = [t.clone().requires_grad_() for t in (hidden, weight)]
    seq = token_logps(*leaves64, labels).sum(-1)
    ref = token_logps(ref_hidden, ref_weight, labels).sum(-1)
    losses, _, _ = dpo_loss(*seq.chunk(2), *ref.chunk(2), beta=0.1)
    exact = losses.mean()
    exact_grads = grads(exact, leaves64)
    leaves = on_device(torch.float32, hidden, weight)
    loss, _ = LinearDPOLoss(beta=0.1, backend=backend)(leaves[0], leaves[1], labels.to(DEVICE),
                                                       ref_hidden=ref_hidden.to(DEVICE, torch.float32),
                                                       ref_weight=ref_weight.to(DEVICE, torch.float32))
    assert_close(loss, exact, rtol=1e-5, name="loss")
    for name, a, e in zip(("grad_hidden", "grad_weight"), grads(loss, leaves), exact_grads):
        assert_close(a, e, rtol=1e-5, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_ppo(backend):
    hidden, weight, _, _, labels = sequences(seed=11)
    mask = labels != -100
    old, adv = tensors(labels.shape, labels.shape, seed=12)
    leaves64 = [t.clone().requires_grad_() for t in (hidden, weight)]
    lp = token_logps(*leaves64, labels)
    old = torch.where(mask, lp.detach() + 0.2 * old, 0.0)   # ratios near 1, some clipped
    exact, _ = ppo_policy_loss(lp, old, adv, mask, clip_eps=0.2, backend="torch")
    exact_grads = grads(exact, leaves64)
    leaves = on_device(torch.float32, hidden, weight)
    loss, _ = LinearPPOLoss(clip_eps=0.2, backend=backend)(leaves[0], leaves[1], labels.to(DEVICE),
                                                           old.to(DEVICE, torch.float32), adv.to(DEVICE, torch.float32))
    assert_close(loss, exact, rtol=1e-5, name="loss")
    for name, a, e in zip(("grad_hidden", "grad_weight"), grads(loss, leaves), exact_grads):
        assert_close(a, e, rtol=1e-5, name=name)


def test_backends_of_this_device():
    """ALIGNFAST_EXPECT_BACKENDS (benchmarks/gpu_check.sh sets it where nvcc built alignfast._C): the native
    backends that must be there, so that a failed build fails here instead of leaving their cases out."""
    expected = {"cuda": {"chunked", "triton"}, "cpu": {"chunked"}}[DEVICE]
    assert expected <= set(BACKENDS), BACKENDS
    for name in filter(None, os.environ.get("ALIGNFAST_EXPECT_BACKENDS", "").split(",")):
        device = "cpu" if name == "cpp" else DEVICE
        assert name in alignfast.backends(device), (name, device, alignfast.backends(device))
