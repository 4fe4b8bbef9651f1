"""The backward over [rows, cols] blocks of vocab slices (`LogitOptions.block_shape`): the one-hot
term only in the slice holding the target, the mean logit's 1/V over the whole vocabulary, and
grad_hidden summed over slices. Small budgets force ragged blocks in both directions; every result
must equal the float64 reference as closely as whole-row chunks do."""
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, max_err
from test_logprobs import make_case, run, upstream_for

import alignfast
from alignfast.ops import options
from alignfast.ops.options import LogitOptions

BACKENDS = [b for b in ("chunked", "cpp") if b in alignfast.backends("cpu")]
V = 1000
# (budget bytes at fp64, MIN_BLOCK_COLS): all rows x 3 ragged slices of 384 | chunks of 5 rows x 7 slices of 150
BLOCKINGS = {"all-rows": (37 * 384 * 8, 64), "rows-and-cols": (5 * 150 * 8, 150)}


@pytest.fixture(params=list(BLOCKINGS))
def blocks(request, monkeypatch):
    budget, min_cols = BLOCKINGS[request.param]
    monkeypatch.setenv("ALIGNFAST_CHUNK_BYTES", str(budget))
    monkeypatch.setattr(options, "MIN_BLOCK_COLS", min_cols)
    return LogitOptions().block_shape(37, V, torch.float64)


def test_block_shape(blocks):
    rows, cols = blocks
    assert (rows, cols) in {(37, 384), (5, 150)}
    assert rows * cols * 8 <= int(os.environ["ALIGNFAST_CHUNK_BYTES"])


def test_block_shape_defaults(monkeypatch):
    monkeypatch.delenv("ALIGNFAST_CHUNK_BYTES", raising=False)
    assert LogitOptions().block_shape(4096, 128256) == (4096, 16384)         # 256 MiB of fp32
    assert LogitOptions().block_shape(65536, 128256) == (16384, 4096)        # too many tokens: min width
    assert LogitOptions().block_shape(10, 300) == (10, 300)                  # small: one block
    assert LogitOptions(chunk_size=3).block_shape(4096, 128256) == (3, 128256)


CASES = {
    "bias-ignored": dict(bias=True, ignore=0.3),
    "softcap-temperature-bias": dict(bias=True, opts=dict(softcap=2.5, temperature=1.3)),
    "temperature-large-logits": dict(scale=30.0, opts=dict(temperature=0.7)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_entropy_lse_grads_match_reference(backend, case, blocks):
    spec = dict(CASES[case])
    opts = spec.pop("opts", {})
    (hidden, weight, bias), targets, g = make_case(37, 16, V, dtype=torch.float64, **spec)
    upstream = upstream_for(targets, g)   # on logprobs, entropy and lse together
    ref_out, ref_grads = run("reference", hidden, weight, targets, bias, upstream, **opts)
    out, grads = run(backend, hidden, weight, targets, bias, upstream, chunk_size=None, **opts)
    for name, a, e in zip(("logprobs", "entropy", "lse", "grad_h", "grad_w", "grad_b"),
                          [*out, *grads], [*ref_out, *ref_grads]):
        assert_close(a, e, rtol=1e-10, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_smoothing_per_token_cross_entropy(backend, blocks):
    """reduction="none" runs the backward with a mean-logit gradient: its 1/V spans the vocabulary."""
    (hidden, weight, bias), targets, g = make_case(37, 16, V, dtype=torch.float64, bias=True, ignore=0.2)
    upstream = torch.randn(targets.shape, generator=g, dtype=torch.float64)
    results = []
    for fn in ("fused", "naive"):
        h, w, b = (t.detach().requires_grad_() for t in (hidden, weight, bias))
        if fn == "fused":
            loss = alignfast.linear_cross_entropy(h, w, targets, b, reduction="none", label_smoothing=0.1,
                                                  z_loss=1e-3, backend=backend)
        else:
            logits = h @ w.t() + b
            loss = F.cross_entropy(logits, targets, reduction="none", label_smoothing=0.1)
            loss = loss + 1e-3 * torch.where(targets != -100, logits.logsumexp(-1), 0.0).square()
        results.append([loss, *torch.autograd.grad((loss * upstream).sum(), (h, w, b))])
    for name, a, e in zip(("loss", "grad_h", "grad_w", "grad_b"), *results):
        assert_close(a, e, rtol=1e-10, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_filter_on_blocks(backend, blocks):
    """A tiny eps keeps every column (exact); a huge one skips every block."""
    (hidden, weight, _), targets, g = make_case(37, 16, V, dtype=torch.float64)
    upstream = upstream_for(targets, g)
    _, exact = run(backend, hidden, weight, targets, None, upstream, chunk_size=None)
    _, tiny = run(backend, hidden, weight, targets, None, upstream, chunk_size=None, grad_filter_eps=1e-300)
    _, huge = run(backend, hidden, weight, targets, None, upstream, chunk_size=None, grad_filter_eps=1e3)
    for a, e in zip(tiny, exact):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=0)
    assert all(gr.abs().max() == 0 for gr in huge)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_blocks_within_twice_reference_error(backend, dtype, blocks):
    (hidden, weight, bias), targets, g = make_case(37, 32, V, dtype=dtype, bias=True, ignore=0.2)
    upstream = upstream_for(targets, g)
    exact_out, exact_grads = run("reference", hidden.double(), weight.double(), targets, bias.double(), upstream)
    ref_out, ref_grads = run("reference", hidden, weight, targets, bias, upstream)
    out, grads = run(backend, hidden, weight, targets, bias, upstream, chunk_size=None)
    for name, a, r, e in zip(("logprobs", "entropy", "lse", "grad_h", "grad_w", "grad_b"),
                             [*out, *grads], [*ref_out, *ref_grads], [*exact_out, *exact_grads]):
        assert a.dtype == r.dtype, name
        slack = 1e-6 * e.abs().max().item()
        assert max_err(a, e) <= 2 * max_err(r, e) + slack, f"{name}: {max_err(a, e):.3e} vs ref {max_err(r, e):.3e}"
