"""linear_logprobs on every available backend against the naive reference run in float64."""
import pytest
import torch
from helpers import assert_close, max_err

import alignfast
from alignfast.ops.logprobs import LogProbs

BACKENDS = [b for b in alignfast.backends("cpu") if b != "reference"]
FP64_BACKENDS = {"chunked", "cpp"}


def make_case(n, h, v, *, dtype=torch.float32, bias=False, ignore=0.0, scale=1.0, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64) * scale
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    if ignore:
        targets[torch.rand(n, generator=g) < ignore] = -100
    if lead is not None:
        hidden, targets = hidden.view(*lead, h), targets.view(*lead)
    cast = [t if t is None else t.to(dtype) for t in (hidden, weight, b)]
    return cast, targets, g


CASES = {
    "N37-H16-V1000": dict(n=37, h=16, v=1000),
    "N1-H16-V1000": dict(n=1, h=16, v=1000),
    "N29-H33-V4097-bias": dict(n=29, h=33, v=4097, bias=True),
    "N40-H16-V1000-mixed-ignored": dict(n=40, h=16, v=1000, ignore=0.4),
    "N8-H16-V999-all-ignored": dict(n=8, h=16, v=999, ignore=1.0),
    "N37-H16-V1000-T0.7": dict(n=37, h=16, v=1000, opts=dict(temperature=0.7)),
    "N37-H16-V1000-softcap-bias": dict(n=37, h=16, v=1000, bias=True, opts=dict(softcap=2.5, temperature=1.3)),
    "N16-H16-V1000-large-logits": dict(n=16, h=16, v=1000, scale=3e3),
    "B3-T7-H16-V1000": dict(n=21, h=16, v=1000, lead=(3, 7), ignore=0.2),
}


def run(backend, hidden, weight, targets, bias, upstream, **opts):
    """Outputs and the gradients of Σ upstream·outputs w.r.t. hidden, weight (and bias)."""
    leaves = [t.detach().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    b = leaves[2] if bias is not None else None
    out = alignfast.linear_logprobs(leaves[0], leaves[1], targets, b, return_entropy=True, return_lse=True,
                                    backend=backend, chunk_size=opts.pop("chunk_size", 8), **opts)
    loss = sum((o.double() * u).sum() for o, u in zip(out, upstream))
    return out, torch.autograd.grad(loss, leaves)


def upstream_for(targets, g):
    return [torch.randn(targets.shape, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_matches_float64_reference(backend, case, poison_empty):
    spec = dict(CASES[case])
    opts = spec.pop("opts", {})
    (hidden, weight, bias), targets, g = make_case(**spec)
    upstream = upstream_for(targets, g)
    ref_out, ref_grads = run("reference", hidden.double(), weight.double(), targets,
                             None if bias is None else bias.double(), upstream, **opts)
    out, grads = run(backend, hidden, weight, targets, bias, upstream, **opts)
    assert isinstance(out, LogProbs)
    if "large-logits" in case:
        # |z|≈1e4: fp32 logits themselves carry ~1e-3 absolute error, so hold the kernel to the
        # 2x-of-PyTorch-fp32 rule here, and require finite outputs.
        fp32_out, fp32_grads = run("reference", hidden, weight, targets, bias, upstream, **opts)
        for a, r, e in zip([*out, *grads], [*fp32_out, *fp32_grads], [*ref_out, *ref_grads]):
            assert torch.isfinite(a).all()
            assert max_err(a, e) <= 2 * max_err(r, e) + 1e-6 * e.abs().max().item()
        return
    for name, a, e in zip(("logprobs", "entropy", "lse"), out, ref_out):
        assert a.dtype == torch.float32 and a.shape == targets.shape
        assert_close(a, e, rtol=1e-5, name=name)
    for name, a, e in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, ref_grads):
        assert a.dtype == torch.float32
        assert_close(a, e, rtol=1e-5, name=name)
    if (targets == -100).any():  # ignored positions: exact zeros, and no gradient into their hidden
        ignored = targets == -100
        for o in out:
            assert (o[ignored] == 0).all()
        assert (grads[0][ignored] == 0).all()


@pytest.mark.parametrize("case", ["N29-H33-V4097-bias", "N37-H16-V1000-softcap-bias", "B3-T7-H16-V1000"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in FP64_BACKENDS])
def test_float64_is_exact(backend, case):
    spec = dict(CASES[case])
    opts = spec.pop("opts", {})
    (hidden, weight, bias), targets, g = make_case(dtype=torch.float64, **spec)
    upstream = upstream_for(targets, g)
    ref_out, ref_grads = run("reference", hidden, weight, targets, bias, upstream, **opts)
    out, grads = run(backend, hidden, weight, targets, bias, upstream, **opts)
    for a, e in zip([*out, *grads], [*ref_out, *ref_grads]):
        assert a.dtype == torch.float64
        assert_close(a, e, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_within_twice_reference_error(backend, dtype):
    """The kernel may not be worse than twice what naive PyTorch in the same dtype achieves."""
    (hidden, weight, bias), targets, g = make_case(41, 32, 1000, dtype=dtype, bias=True, ignore=0.2)
    upstream = upstream_for(targets, g)
    exact_out, exact_grads = run("reference", hidden.double(), weight.double(), targets, bias.double(), upstream)
    ref_out, ref_grads = run("reference", hidden, weight, targets, bias, upstream)
    out, grads = run(backend, hidden, weight, targets, bias, upstream)
    for name, a, r, e in zip(("logprobs", "entropy", "lse", "grad_h", "grad_w", "grad_b"),
                             [*out, *grads], [*ref_out, *ref_grads], [*exact_out, *exact_grads]):
        assert not torch.isnan(a).any(), name
        slack = 1e-6 * e.abs().max().item()
        assert max_err(a, e) <= 2 * max_err(r, e) + slack, f"{name}: {max_err(a, e):.3e} vs ref {max_err(r, e):.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    (hidden, weight, _), targets, g = make_case(24, 16, 1000)
    hidden_t = hidden.t().contiguous().t()  # same values, column-major
    weight_nc = torch.stack([weight, -weight], dim=2).flatten(1)[:, ::2]  # strided view of weight
    assert not hidden_t.is_contiguous() and not weight_nc.is_contiguous()
    upstream = upstream_for(targets, g)
    ref_out, ref_grads = run("reference", hidden.double(), weight.double(), targets, None, upstream)
    out, grads = run(backend, hidden_t, weight_nc, targets, None, upstream)
    for a, e in zip([*out, *grads], [*ref_out, *ref_grads]):
        assert_close(a, e, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_not_requested_are_none_and_grads_only_where_needed(backend):
    (hidden, weight, _), targets, _ = make_case(10, 16, 300)
    weight.requires_grad_(False)
    hidden.requires_grad_()
    out = alignfast.linear_logprobs(hidden, weight, targets, backend=backend)
    assert out.entropy is None and out.lse is None
    out.logprobs.sum().backward()
    assert hidden.grad is not None and weight.grad is None
    ref = alignfast.linear_logprobs(hidden.double(), weight.double(), targets, backend="reference")
    assert_close(out.logprobs, ref.logprobs, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 5, 64, None])
def test_chunked_independent_of_chunk_size(chunk_size):
    (hidden, weight, bias), targets, g = make_case(23, 16, 1000, dtype=torch.float64, bias=True, ignore=0.3)
    upstream = upstream_for(targets, g)
    ref_out, ref_grads = run("reference", hidden, weight, targets, bias, upstream)
    out, grads = run("chunked", hidden, weight, targets, bias, upstream, chunk_size=chunk_size)
    for a, e in zip([*out, *grads], [*ref_out, *ref_grads]):
        assert_close(a, e, rtol=1e-10)


def test_byte_budget_bounds_the_chunk(monkeypatch):
    from alignfast.ops.options import LogitOptions

    monkeypatch.setenv("ALIGNFAST_CHUNK_BYTES", str(4 * 1000 * 7))
    assert LogitOptions().chunk_rows(1000) == 7
    assert LogitOptions(chunk_size=3).chunk_rows(1000) == 3
    monkeypatch.setenv("ALIGNFAST_CHUNK_BYTES", "1")
    assert LogitOptions().chunk_rows(1000) == 1


def test_budget_sized_blocks_are_aligned(monkeypatch):
    """Budget-sized block dimensions are whole 64-byte lines of fp32 (BLAS runs odd ones slowly)."""
    from alignfast.ops.kl import KLOptions
    from alignfast.ops.options import LogitOptions

    monkeypatch.delenv("ALIGNFAST_CHUNK_BYTES", raising=False)
    assert LogitOptions().chunk_rows(128256) == 512          # 523 fit the 256 MiB budget
    assert LogitOptions().chunk_rows(128256, torch.float64) == 256   # 261 fit
    assert KLOptions(backend="chunked").block_shape(100_000, 128256) == (5456, 4096)   # 5461 rows of 3 fit
    assert KLOptions(backend="cpp").block_shape(2048, 128256) == (2048, 16384)   # 16384 cols of 2 blocks
    assert KLOptions(backend="cpp", chunk_size=7).block_shape(2048, 128256) == (7, 128256)
    assert LogitOptions().block_shape(4000, 128256) == (4000, 16768)   # 16777 fit
    assert LogitOptions().block_shape(100_000, 128256) == (16384, 4096)
    assert LogitOptions().block_shape(4000, 4099) == (4000, 4099)   # the whole vocabulary fits
    monkeypatch.setenv("ALIGNFAST_CHUNK_BYTES", str(4 * 1000 * 31))
    assert LogitOptions().chunk_rows(1000) == 31              # rounding would lose over half
    monkeypatch.setenv("ALIGNFAST_CHUNK_BYTES", str(4 * 1000 * 47))
    assert LogitOptions().chunk_rows(1000) == 32


def test_auto_backend_on_cpu():
    expected = "cpp" if "cpp" in alignfast.backends() else "chunked"
    from alignfast.dispatch import resolve

    assert resolve("auto", torch.device("cpu")) == expected
