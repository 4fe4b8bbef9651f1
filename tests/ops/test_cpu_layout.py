"""The `cpp` backend's token-chunk layout (`alignfast.ops.cpu_layout`): the knob, and the same numbers
in both layouts through every path that forms token chunks, against float64 oracles."""
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

import alignfast
from alignfast.losses.fused_preference import LinearDPOLoss
from alignfast.ops import cpu_layout
from alignfast.ops.logprobs import implementation

needs_cpp = pytest.mark.skipif("cpp" not in alignfast.backends("cpu"), reason="alignfast._C is not built")
LAYOUTS = ["row", "vocab"]


@pytest.mark.parametrize("vendor,vocab_major", [("GenuineIntel", True), ("AuthenticAMD", False), ("", False)])
def test_auto_follows_the_cpu_vendor(monkeypatch, vendor, vocab_major):
    monkeypatch.setattr(cpu_layout, "cpu_vendor", lambda: vendor)
    monkeypatch.delenv("ALIGNFAST_CPU_LAYOUT", raising=False)
    assert cpu_layout.token_chunks_vocab_major() is vocab_major
    monkeypatch.setenv("ALIGNFAST_CPU_LAYOUT", "auto")
    assert cpu_layout.token_chunks_vocab_major() is vocab_major


@pytest.mark.parametrize("value,vocab_major", [("row", False), ("vocab", True), (" Vocab ", True), ("ROW", False)])
def test_override(monkeypatch, value, vocab_major):
    for vendor in ("GenuineIntel", "AuthenticAMD"):
        monkeypatch.setattr(cpu_layout, "cpu_vendor", lambda: vendor)
        monkeypatch.setenv("ALIGNFAST_CPU_LAYOUT", value)
        assert cpu_layout.token_chunks_vocab_major() is vocab_major


def test_this_machine_has_a_vendor():
    """On Linux the vendor comes from /proc/cpuinfo; a missing file gives "" (row-major), never an error."""
    assert isinstance(cpu_layout.cpu_vendor(), str)


@needs_cpp
def test_bad_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("ALIGNFAST_CPU_LAYOUT", "column")
    hidden, weight, targets = torch.randn(4, 8), torch.randn(30, 8), torch.randint(0, 30, (4,))
    with pytest.raises(ValueError, match=r"ALIGNFAST_CPU_LAYOUT must be one of .*'column'"):
        alignfast.linear_cross_entropy(hidden, weight, targets, backend="cpp")


@needs_cpp
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_driver_forms_token_chunks_in_the_layout(monkeypatch, layout):
    monkeypatch.setenv("ALIGNFAST_CPU_LAYOUT", layout)
    z = implementation("cpp")._logits(torch.randn(5, 8), torch.randn(30, 8), None, None)
    assert z.shape == (5, 30) and z.stride() == ((1, 5) if layout == "vocab" else (30, 1))
    # vocab slices of all tokens stay row-major in either layout
    z = implementation("cpp")._logits(torch.randn(5, 8), torch.randn(30, 8), None, None, whole_vocab=False)
    assert z.stride() == (30, 1)


def _leaves(dtype, n=29, h=20, v=517, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5
    bias = torch.randn(v, generator=g, dtype=torch.float64)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = -100
    return [t.to(dtype) for t in (hidden, weight, bias)], targets, g


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cross_entropy(monkeypatch, layout, reduction, dtype):
    """The fused forward+backward over token chunks (7 rows), with softcap, temperature, smoothing, z-loss."""
    monkeypatch.setenv("ALIGNFAST_CPU_LAYOUT", layout)
    (hidden, weight, bias), targets, g = _leaves(dtype)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    oracle = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0, temperature=0.9)
    loss = alignfast.linear_cross_entropy(leaves[0], leaves[1], targets, leaves[2], reduction=reduction,
                                          backend="cpp", chunk_size=7, **kw)

    logits = oracle[0] @ oracle[1].t() + oracle[2]
    logits = 4.0 * torch.tanh(logits / 4.0) / 0.9
    want = F.cross_entropy(logits, targets, reduction="none", label_smoothing=0.1)
    want = want + 1e-3 * torch.logsumexp(logits, -1).square() * (targets != -100)
    if reduction == "mean":
        want = want.sum() / (targets != -100).sum()
    upstream = torch.randn(want.shape, generator=g, dtype=torch.float64)
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    assert_close(loss, want, rtol=rtol, name="loss")
    got = torch.autograd.grad((loss.double() * upstream).sum(), leaves)
    for name, a, e in zip(("grad_hidden", "grad_weight", "grad_bias"), got,
                          torch.autograd.grad((want * upstream).sum(), oracle)):
        assert_close(a, e, rtol=rtol, name=name)


@needs_cpp
@pytest.mark.parametrize("layout", LAYOUTS)
def test_logprobs_in_token_chunks(monkeypatch, layout):
    """linear_logprobs with chunk_size (token chunks of whole rows: forward and recompute), arbitrary
    upstream gradients on log-prob, entropy and lse."""
    monkeypatch.setenv("ALIGNFAST_CPU_LAYOUT", layout)
    (hidden, weight, bias), targets, g = _leaves(torch.float64, seed=1)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    oracle = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    out = alignfast.linear_logprobs(leaves[0], leaves[1], targets, leaves[2], return_entropy=True,
                                    return_lse=True, backend="cpp", chunk_size=6)
    logp = F.log_softmax(oracle[0] @ oracle[1].t() + oracle[2], -1)
    valid = targets != -100
    want = (logp.gather(1, targets.where(valid, 0)[:, None]).squeeze(1) * valid,
            -(logp.exp() * logp).sum(-1) * valid,
            torch.logsumexp(oracle[0] @ oracle[1].t() + oracle[2], -1) * valid)
    upstream = [torch.randn(targets.shape, generator=g, dtype=torch.float64) for _ in want]
    for name, a, e in zip(("logprob", "entropy", "lse"), out, want):
        assert_close(a, e, rtol=1e-10, name=name)
    got = torch.autograd.grad(sum((o * u).sum() for o, u in zip(out, upstream)), leaves)
    wanted = torch.autograd.grad(sum((o * u).sum() for o, u in zip(want, upstream)), oracle)
    for name, a, e in zip(("grad_hidden", "grad_weight", "grad_bias"), got, wanted):
        assert_close(a, e, rtol=1e-10, name=name)


@needs_cpp
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_dpo(monkeypatch, layout):
    """A fused loss (DPO with a reference model's hidden states) on cpp against the naive backend."""
    monkeypatch.setenv("ALIGNFAST_CPU_LAYOUT", layout)
    g = torch.Generator().manual_seed(2)
    pairs, t, h, v = 3, 7, 12, 211
    labels = torch.randint(0, v, (2 * pairs, t), generator=g)
    labels[:, :2] = -100
    labels[4, -2:] = -100
    inputs = dict(hidden=torch.randn(2 * pairs, t, h, generator=g, dtype=torch.float64),
                  weight=torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5)
    refs = dict(ref_hidden=torch.randn(2 * pairs, t, h, generator=g, dtype=torch.float64),
                ref_weight=torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5)

    def run(backend, **kw):
        leaves = {k: x.clone().requires_grad_() for k, x in inputs.items()}
        loss, metrics = LinearDPOLoss(backend=backend, beta=0.3, **kw)(leaves["hidden"], leaves["weight"], labels,
                                                                       **refs)
        return loss, metrics, torch.autograd.grad(loss, list(leaves.values()))

    loss, metrics, grads = run("cpp", chunk_size=10)
    want, want_metrics, want_grads = run("reference")
    assert_close(loss, want, rtol=1e-10, name="loss")
    for name, a, e in zip(inputs, grads, want_grads):
        assert_close(a, e, rtol=1e-10, name=name)
    assert_close(metrics["rewards/margins"], want_metrics["rewards/margins"], rtol=1e-10, name="margins")
