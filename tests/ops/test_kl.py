"""linear_kl on every backend against an independent float64 computation with materialised logits."""
import pytest
import torch
from helpers import assert_close, max_err

import alignfast
from alignfast.ops import native_rows
from alignfast.ops.kl import kl_backends, make_kl_options

BACKENDS = [b for b in alignfast.backends("cpu") if b in kl_backends() and b != "reference"]


def naive_kl(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, *, mask=None, reverse=False,
             temperature=1.0):
    """Σ p (log p − log q) (reverse: Σ q (log q − log p)) from materialised logits, fp32 or fp64 math
    after a matmul in the input dtype (what a user would write), 0 where mask is False."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    z = hidden @ weight.t() + (0 if bias is None else bias)
    z_ref = ref_hidden @ ref_weight.t() + (0 if ref_bias is None else ref_bias)
    logp = torch.log_softmax(z.to(acc) / temperature, dim=-1)
    logq = torch.log_softmax(z_ref.to(acc) / temperature, dim=-1)
    kl = (logq.exp() * (logq - logp)).sum(-1) if reverse else (logp.exp() * (logp - logq)).sum(-1)
    return kl if mask is None else torch.where(mask, kl, 0.0)


def make_case(n, h, v, *, h_ref=None, dtype=torch.float32, bias=False, masked=0.0, lead=None, seed=0):
    """Independent random policy and reference (KL of order 1), cast to `dtype`."""
    g = torch.Generator().manual_seed(seed)
    h_ref = h if h_ref is None else h_ref
    t = dict(
        hidden=torch.randn(n, h, generator=g, dtype=torch.float64),
        weight=torch.randn(v, h, generator=g, dtype=torch.float64) * 1.5 / h**0.5,
        bias=torch.randn(v, generator=g, dtype=torch.float64) if bias else None,
        ref_hidden=torch.randn(n, h_ref, generator=g, dtype=torch.float64),
        ref_weight=torch.randn(v, h_ref, generator=g, dtype=torch.float64) * 1.5 / h_ref**0.5,
        ref_bias=torch.randn(v, generator=g, dtype=torch.float64) if bias else None,
    )
    mask = None
    if masked:
        mask = torch.rand(n, generator=g) >= masked
    if lead is not None:
        t["hidden"], t["ref_hidden"] = t["hidden"].view(*lead, h), t["ref_hidden"].view(*lead, h_ref)
        mask = None if mask is None else mask.view(*lead)
    t = {k: None if x is None else x.to(dtype) for k, x in t.items()}
    upstream = torch.randn(t["hidden"].shape[:-1], generator=g, dtype=torch.float64)
    return t, mask, upstream


def grads_of(fn, t, upstream):
    """fn's per-token KL and the gradients of Σ upstream·KL w.r.t. hidden, weight (and bias)."""
    leaves = {k: t[k].detach().requires_grad_() for k in ("hidden", "weight", "bias") if t[k] is not None}
    kl = fn({**t, **leaves})
    return kl, torch.autograd.grad((kl.double() * upstream).sum(), list(leaves.values()))


def naive_run(t, mask, upstream, **opts):
    return grads_of(lambda a: naive_kl(**a, mask=mask, **opts), t, upstream)


def backend_run(backend, t, mask, upstream, chunk_size=8, **opts):
    def fn(a):
        return alignfast.linear_kl(a["hidden"], a["weight"], a["ref_hidden"], a["ref_weight"], bias=a["bias"],
                                   ref_bias=a["ref_bias"], targets_mask=mask, backend=backend,
                                   chunk_size=chunk_size, **opts)

    return grads_of(fn, t, upstream)


def fp64(t):
    return {k: None if x is None else x.double() for k, x in t.items()}


CASES = {
    "N37-H16-V1000": dict(n=37, h=16, v=1000),
    "N1-H16-V1000": dict(n=1, h=16, v=1000),
    "N29-H33-Href20-V4097-bias": dict(n=29, h=33, v=4097, h_ref=20, bias=True),
    "N37-H16-V1000-T0.7": dict(n=37, h=16, v=1000, opts=dict(temperature=0.7)),
    "N37-H16-V1000-T1.6-bias": dict(n=37, h=16, v=1000, bias=True, opts=dict(temperature=1.6)),
    "N40-H16-V1000-masked": dict(n=40, h=16, v=1000, masked=0.4),
    "N8-H16-V999-all-masked": dict(n=8, h=16, v=999, masked=1.0),
    "B3-T7-H16-Href24-V1000-masked": dict(n=21, h=16, v=1000, h_ref=24, lead=(3, 7), masked=0.3),
}


def split(case):
    spec = dict(CASES[case])
    return spec.pop("opts", {}), spec


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_vocab_slices_merge_exactly(backend, reverse, dtype, monkeypatch):
    """A budget that fits all 16 tokens by only a slice of the 9000-entry vocabulary: the forward merges the
    slices' KLs and logsumexps per row, the backward pushes each slice's gradient on its own."""
    itemsize = 8 if dtype == torch.float64 else 4
    monkeypatch.setenv("ALIGNFAST_CHUNK_BYTES", str(3 * 16 * 4200 * itemsize))   # 2 (cpp) or 3 (chunked) slices
    t, mask, upstream = make_case(16, 16, 9000, bias=True, masked=0.2, dtype=dtype, seed=3)
    rows, cols = make_kl_options(t["hidden"], t["weight"], t["ref_hidden"], t["ref_weight"], None, None, None,
                                 reverse=reverse, temperature=0.9, backend=backend,
                                 chunk_size=None).block_shape(16, 9000, dtype)
    assert rows == 16 and cols < 9000, (rows, cols)
    exact, exact_grads = naive_run(fp64(t), mask, upstream, reverse=reverse, temperature=0.9)
    kl, grads = backend_run(backend, t, mask, upstream, chunk_size=None, reverse=reverse, temperature=0.9)
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    for name, a, e in zip(("kl", "grad_hidden", "grad_weight", "grad_bias"), [kl, *grads], [exact, *exact_grads]):
        assert_close(a, e, rtol=rtol, name=name)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_fp32_matches_float64(backend, case, reverse, poison_empty):
    opts, spec = split(case)
    t, mask, upstream = make_case(**spec)
    exact, exact_grads = naive_run(fp64(t), mask, upstream, reverse=reverse, **opts)
    kl, grads = backend_run(backend, t, mask, upstream, reverse=reverse, **opts)
    assert kl.dtype == torch.float32 and kl.shape == t["hidden"].shape[:-1]
    assert_close(kl, exact, rtol=1e-5, name="kl")
    for name, a, e in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, exact_grads):
        assert a.dtype == torch.float32
        assert_close(a, e, rtol=1e-5, name=name)
    if mask is not None:  # masked positions: exact zeros, and no gradient into their hidden
        assert (kl[~mask] == 0).all() and (grads[0][~mask] == 0).all()
    assert (kl >= -1e-5).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_large_logits_as_accurate_as_naive(backend):
    """Peaked rows (logits in the tens, KL ~ 90 nats): log p must be formed relative to the row max, as
    log_softmax does; x − lse rounds at |lse|'s magnitude (chunked was 10x naive's error)."""
    def worst(run):
        errs = []
        for seed in range(4):
            t, _, upstream = make_case(16, 16, 256, seed=seed)
            t = {**t, "hidden": t["hidden"] * 7.5, "ref_hidden": t["ref_hidden"] * 7.5}
            _, (exact, _) = naive_run(fp64(t), None, upstream)
            _, (grad_hidden, _) = run(t, upstream)
            errs.append(float((grad_hidden.double() - exact).abs().max() / exact.abs().max()))
        return max(errs)

    naive = worst(lambda t, u: naive_run(t, None, u))
    got = worst(lambda t, u: backend_run(backend, t, None, u, chunk_size=5))
    assert got <= 3 * naive, (got, naive)


@pytest.mark.parametrize("chunk_size", [1, 5, None])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("case", ["N29-H33-Href20-V4097-bias", "N37-H16-V1000-T0.7",
                                  "B3-T7-H16-Href24-V1000-masked"])
def test_chunked_float64_is_exact(case, reverse, chunk_size):
    opts, spec = split(case)
    t, mask, upstream = make_case(dtype=torch.float64, **spec)
    exact, exact_grads = naive_run(t, mask, upstream, reverse=reverse, **opts)
    kl, grads = backend_run("chunked", t, mask, upstream, chunk_size=chunk_size, reverse=reverse, **opts)
    for a, e in zip([kl, *grads], [exact, *exact_grads]):
        assert a.dtype == torch.float64
        assert_close(a, e, rtol=1e-10)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_within_twice_naive_error(backend, reverse):
    """The op in bf16 may not be worse than twice the naive bf16 computation (vs float64)."""
    t, mask, upstream = make_case(41, 32, 1000, h_ref=24, dtype=torch.bfloat16, bias=True, masked=0.2)
    exact, exact_grads = naive_run(fp64(t), mask, upstream, reverse=reverse, temperature=0.8)
    naive, naive_grads = naive_run(t, mask, upstream, reverse=reverse, temperature=0.8)
    kl, grads = backend_run(backend, t, mask, upstream, reverse=reverse, temperature=0.8)
    assert kl.dtype == torch.float32
    for name, a, r, e in zip(("kl", "grad_h", "grad_w", "grad_b"), [kl, *grads], [naive, *naive_grads],
                             [exact, *exact_grads]):
        assert not torch.isnan(a).any(), name
        slack = 1e-6 * e.abs().max().item()
        err, naive_err = max_err(a, e), max_err(r, e)
        assert err <= 2 * naive_err + slack, f"{name}: {err:.3e} vs naive {naive_err:.3e}"


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_zero_when_policy_is_reference(backend, reverse):
    t, _, upstream = make_case(19, 16, 1000, bias=True)
    t.update(ref_hidden=t["hidden"].clone(), ref_weight=t["weight"].clone(), ref_bias=t["bias"].clone())
    kl, grads = backend_run(backend, t, None, upstream, reverse=reverse, temperature=0.9)
    assert kl.abs().max().item() <= 1e-6
    for g in grads:
        assert g.abs().max().item() <= 1e-6


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_triton_several_tiles_per_dimension(reverse, monkeypatch):
    """Force small blocks so the online rescaling runs over many vocab tiles and H tiles, with
    partial token blocks and grouped backward programs."""
    if "triton" not in BACKENDS:
        pytest.skip("triton unavailable")
    from alignfast.kernels import kl as triton_kl
    from alignfast.kernels.logprobs import BlockConfig

    small = BlockConfig(block_n=16, block_v=64, block_h=16, num_warps=1, num_stages=1, group_n=2)
    monkeypatch.setattr(triton_kl, "default_config", lambda *a, **k: small)
    t, mask, upstream = make_case(20, 40, 300, h_ref=20, bias=True, masked=0.1, seed=3)
    exact, exact_grads = naive_run(fp64(t), mask, upstream, reverse=reverse, temperature=1.3)
    kl, grads = backend_run("triton", t, mask, upstream, reverse=reverse, temperature=1.3)
    for a, e in zip([kl, *grads], [exact, *exact_grads]):
        assert_close(a, e, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    t, _, upstream = make_case(24, 16, 1000, h_ref=12)
    exact, exact_grads = naive_run(fp64(t), None, upstream)
    strided = dict(t)
    strided["hidden"] = t["hidden"].t().contiguous().t()
    strided["ref_weight"] = torch.stack([t["ref_weight"], -t["ref_weight"]], dim=2).flatten(1)[:, ::2]
    assert not strided["hidden"].is_contiguous() and not strided["ref_weight"].is_contiguous()
    kl, grads = backend_run(backend, strided, None, upstream)
    for a, e in zip([kl, *grads], [exact, *exact_grads]):
        assert_close(a, e, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_reference_side_gets_no_gradient(backend):
    t, _, _ = make_case(10, 16, 300, h_ref=8, bias=True)
    leaves = {k: v.requires_grad_() for k, v in t.items()}
    kl = alignfast.linear_kl(leaves["hidden"], leaves["weight"], leaves["ref_hidden"], leaves["ref_weight"],
                             bias=leaves["bias"], ref_bias=leaves["ref_bias"], backend=backend)
    kl.sum().backward()
    assert all(leaves[k].grad is not None for k in ("hidden", "weight", "bias"))
    assert all(leaves[k].grad is None for k in ("ref_hidden", "ref_weight", "ref_bias"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_only_where_needed(backend):
    t, _, _ = make_case(10, 16, 300)
    hidden = t["hidden"].requires_grad_()
    kl = alignfast.linear_kl(hidden, t["weight"], t["ref_hidden"], t["ref_weight"], backend=backend)
    kl.sum().backward()
    assert hidden.grad is not None and t["weight"].grad is None
    with torch.no_grad():
        assert not alignfast.linear_kl(hidden, t["weight"], t["ref_hidden"], t["ref_weight"],
                                       backend=backend).requires_grad


@pytest.mark.skipif(not native_rows.kl_available(), reason="alignfast._C with the KL kernels is not built")
def test_auto_picks_the_native_kernels_on_cpu():
    t, mask, _ = make_case(4, 8, 50)
    opts = make_kl_options(t["hidden"], t["weight"], t["ref_hidden"], t["ref_weight"], None, None, mask,
                           reverse=False, temperature=1.0, backend="auto", chunk_size=None)
    assert opts.backend == "cpp"


def test_a_native_build_without_kl_kernels_is_not_offered(monkeypatch):
    """An alignfast._C built before the KL kernels: `auto` takes `chunked`, backend="cpp" says what is there."""
    from alignfast import dispatch

    monkeypatch.setattr(dispatch, "_has_native", lambda device_type: True)
    monkeypatch.setattr(native_rows, "kl_available", lambda: False)
    t, mask, _ = make_case(4, 8, 50)
    opts = make_kl_options(t["hidden"], t["weight"], t["ref_hidden"], t["ref_weight"], None, None, mask,
                           reverse=False, temperature=1.0, backend="auto", chunk_size=None)
    assert opts.backend == "chunked"
    with pytest.raises(RuntimeError, match=r"backend='cpp' is not available.*\['reference', 'chunked'"):
        alignfast.linear_kl(t["hidden"], t["weight"], t["ref_hidden"], t["ref_weight"], backend="cpp")


H, H_REF, V = 8, 6, 20


def kl_args(**over):
    a = dict(hidden=torch.randn(5, H), weight=torch.randn(V, H), ref_hidden=torch.randn(5, H_REF),
             ref_weight=torch.randn(V, H_REF))
    a.update(over)
    return a


BAD = {
    "ref-V": (kl_args(ref_weight=torch.randn(V + 1, H_REF)), ValueError,
              r"ref_weight \(21, 6\) and weight \(20, 8\)"),
    "ref-H": (kl_args(ref_weight=torch.randn(V, H_REF + 1)), ValueError,
              r"ref_hidden .* ref_weight .*disagree on H"),
    "ref-leading": (kl_args(ref_hidden=torch.randn(6, H_REF)), ValueError,
                    r"ref_hidden \(6, 6\) must have hidden's"),
    "ref-lead-3d": (kl_args(hidden=torch.randn(1, 5, H)), ValueError, r"ref_hidden \(5, 6\) .* \(1, 5\)"),
    "ref-bias": (kl_args(ref_bias=torch.randn(V - 1)), ValueError, r"ref_bias must be \[V\]=20"),
    "ref-dtype": (kl_args(ref_hidden=torch.randn(5, H_REF).double(),
                          ref_weight=torch.randn(V, H_REF).double()), ValueError,
                  r"ref_hidden \(torch.float64\) and hidden \(torch.float32\)"),
    "ref-not-tensor": (kl_args(ref_hidden=None), TypeError, r"ref_hidden must be a torch.Tensor"),
    "ref-meta": (kl_args(ref_hidden=torch.randn(5, H_REF, device="meta"),
                         ref_weight=torch.randn(V, H_REF, device="meta")), ValueError,
                 r"ref_hidden is a meta tensor"),
    "mask-shape": (kl_args(targets_mask=torch.ones(6, dtype=torch.bool)), ValueError,
                   r"targets_mask shape \(6,\)"),
    "mask-dtype": (kl_args(targets_mask=torch.ones(5, dtype=torch.int64)), ValueError,
                   r"targets_mask must be a bool"),
    "mask-device": (kl_args(targets_mask=torch.ones(5, dtype=torch.bool, device="meta")), ValueError,
                    r"targets_mask is on meta"),
    "temperature-0": (kl_args(temperature=0.0), ValueError, r"temperature"),
    "temperature-neg": (kl_args(temperature=-1.0), ValueError, r"temperature"),
    "reverse-str": (kl_args(reverse="yes"), ValueError, r"reverse must be a bool"),
    "chunk-0": (kl_args(chunk_size=0), ValueError, r"chunk_size"),
    "backend": (kl_args(backend="fast"), ValueError, r"backend='fast' is unknown"),
    "policy-H": (kl_args(weight=torch.randn(V, H + 1)), ValueError, r"hidden .* weight .*disagree on H"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input(case):
    kwargs, err, pattern = BAD[case]
    kwargs = dict(kwargs)
    positional = [kwargs.pop(k) for k in ("hidden", "weight", "ref_hidden", "ref_weight")]
    with pytest.raises(err, match=pattern):
        alignfast.linear_kl(*positional, **kwargs)


def test_triton_offsets_past_2_31_elements():
    """A reference operand whose rows lie past 2³¹ elements: the Triton kernels index it in int64."""
    if "triton" not in BACKENDS:
        pytest.skip("triton unavailable")
    from alignfast.kernels import kl as triton_kl
    from alignfast.ops.kl import KLOptions

    t, _, upstream = make_case(3, 16, 300, seed=5)
    base = torch.empty(2 * 2**30 + 16, dtype=torch.float32)
    far_ref = base.as_strided((3, 16), (2**30, 1)).copy_(t["ref_hidden"])  # row 2 at element 2³¹
    opts = KLOptions(backend="triton")
    stats = triton_kl.forward(t["hidden"], t["weight"], None, far_ref, t["ref_weight"], None, opts)
    grads = triton_kl.backward(t["hidden"], t["weight"], None, far_ref, t["ref_weight"], None, stats,
                               upstream.float(), opts, (True, True, False))
    want, want_grads = naive_run({k: None if x is None else x.double() for k, x in t.items()}, None, upstream)
    assert_close(stats.kl, want, rtol=1e-5, name="kl")
    for name, a, e in zip(("grad_hidden", "grad_weight"), grads, want_grads):
        assert_close(a, e, rtol=1e-5, name=name)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_reduced_matches_float64(backend, reverse, reduction):
    """reduction="mean"/"sum" over the masked-in positions; the native backends form the gradient in
    the forward (token chunks of 8 rows here), the others reduce the per-token KL."""
    t, mask, _ = make_case(29, 33, 1037, h_ref=20, bias=True, masked=0.3, seed=4)
    t64 = fp64(t)
    leaves64 = {k: t64[k].detach().requires_grad_() for k in ("hidden", "weight", "bias")}
    per_token = naive_kl(**{**t64, **leaves64}, mask=mask, reverse=reverse, temperature=0.8)
    exact = per_token.sum() / (int(mask.sum()) if reduction == "mean" else 1)
    exact_grads = torch.autograd.grad(exact, list(leaves64.values()))
    leaves = {k: t[k].detach().requires_grad_() for k in ("hidden", "weight", "bias")}
    a = {**t, **leaves}
    loss = alignfast.linear_kl(a["hidden"], a["weight"], a["ref_hidden"], a["ref_weight"], bias=a["bias"],
                               ref_bias=a["ref_bias"], targets_mask=mask, reverse=reverse, temperature=0.8,
                               backend=backend, chunk_size=8, reduction=reduction)
    assert loss.shape == () and loss.dtype == torch.float32
    assert_close(loss, exact, rtol=1e-5, name="loss")
    for name, g, e in zip(("grad_hidden", "grad_weight", "grad_bias"),
                          torch.autograd.grad(loss * 1.7, list(leaves.values())), exact_grads):
        assert_close(g, 1.7 * e, rtol=1e-5, name=name)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="alignfast._C with the KL kernels is not built")
def test_reduced_native_forms_the_gradient_in_the_forward(monkeypatch):
    """4 vocab projections (policy and reference logits, grad_hidden, grad_weight) per chunk, not 6."""
    t, _, _ = make_case(24, 16, 300, seed=5)
    counts = {"mm": 0}

    def counting(real):
        def product(*args, **kwargs):
            counts["mm"] += 1
            return real(*args, **kwargs)
        return product

    monkeypatch.setattr(torch, "mm", counting(torch.mm))
    monkeypatch.setattr(torch.Tensor, "addmm_", counting(torch.Tensor.addmm_))
    leaves = [t["hidden"].detach().requires_grad_(), t["weight"].detach().requires_grad_()]
    loss = alignfast.linear_kl(leaves[0], leaves[1], t["ref_hidden"], t["ref_weight"], backend="cpp",
                               chunk_size=8, reduction="mean")
    forward_products = counts["mm"]
    loss.backward()
    assert counts["mm"] == forward_products, "the backward only scales the saved gradients"
    assert forward_products == 3 * 4, forward_products   # 3 chunks × (logits, ref logits, dh, dW)
