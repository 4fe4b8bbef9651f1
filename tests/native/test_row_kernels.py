"""The native row kernels (`alignfast.ops.native_rows`) against the PyTorch row kernels
(`alignfast.ops.rowwise`) they replace: float64 to ~1e-12, float32 within 2× (+ slack) of what the
PyTorch kernels achieve in float32 against float64. Every check runs on both layouts the CPU kernels
read: row-major blocks, and vocab-major ones (the transpose of a [V, rows] product W·hᵀ)."""
import pytest
import torch
from helpers import assert_close, max_err

from alignfast.ops import native_rows, rowwise
from alignfast.ops.options import LogitOptions

pytestmark = pytest.mark.skipif(not native_rows.available(), reason="alignfast._C is not built")

CASES = {  # n, V, scale of the logits, options
    "N13-V1000": (13, 1000, 3.0, {}),
    "N1-V1000": (1, 1000, 3.0, {}),
    "N9-V4097-T0.7": (9, 4097, 3.0, dict(temperature=0.7)),
    "N7-V4097-softcap": (7, 4097, 10.0, dict(softcap=2.5)),
    "N5-V1003-softcap-T1.3": (5, 1003, 10.0, dict(softcap=30.0, temperature=1.3)),
    # z/softcap ~1e-4: tanh as 1 − 2/(e^{2y}+1) kept only ~1e-7 absolute, 1e-3 of z's digits
    "N5-V1003-large-softcap": (5, 1003, 3.0, dict(softcap=3e4)),
    "N4-V7": (4, 7, 3.0, {}),
    "N3-V1": (3, 1, 3.0, {}),
    "N6-V2500-large-logits": (6, 2500, 1e4, {}),
    "N37-V1000": (37, 1000, 3.0, {}),   # vocab-major: two full packs of rows and a partial one
    "N32-V300-T0.7": (32, 300, 3.0, dict(temperature=0.7)),
}
LAYOUTS = ("row", "vocab")
FLAGS = {"plain": (False, False), "entropy": (True, False), "zmean": (False, True), "both": (True, True)}


def make_block(n, v, scale, dtype, seed=0, pad=0, layout="row"):
    """Raw logits [n, v] and targets [n]. Row layout: a view into [n, v + pad] whose padding is NaN;
    vocab layout: the transpose of a view into [v, n + pad], the same values, NaN padding likewise."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    targets = torch.randint(0, v, (n,), generator=g)
    full = torch.full((n, v + pad) if layout == "row" else (v, n + pad), float("nan"), dtype=dtype)
    block = full[:, :v] if layout == "row" else full[:, :n].t()
    return block.copy_(z), targets, g


def padding_of(block, layout):
    """The NaN padding beside a `make_block` block (the kernels must not write there)."""
    full = block._base   # the padded tensor the block is a view of
    return full[:, block.shape[1]:] if layout == "row" else full[:, block.shape[0]:]


def opts_for(spec, flags):
    ent, zm = FLAGS[flags]
    return LogitOptions(with_entropy=ent, with_zmean=zm, **spec)


def upstream(n, g, dtype, present):
    """(g_logprob, g_entropy, g_lse, g_zmean), None where absent."""
    return [torch.randn(n, generator=g, dtype=torch.float64).to(dtype) if p else None for p in present]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("case", list(CASES))
def test_stats_float64(case, flags, layout):
    n, v, scale, spec = CASES[case]
    opts = opts_for(spec, flags)
    z, t, _ = make_block(n, v, scale, torch.float64, pad=3, layout=layout)
    before = z.clone()
    got, want = native_rows.stats(z, t, opts), rowwise.stats(z.clone(), t, opts)
    assert torch.equal(z, before), "stats must leave z unchanged"
    for name, a, b in zip(("logprob", "entropy", "lse", "zmean"), got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == torch.float64
            assert_close(a, b, rtol=1e-12, atol=1e-12 * (1 + scale), name=name)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("case", list(CASES))
def test_stats_float32_within_2x_of_torch(case, flags, layout):
    n, v, scale, spec = CASES[case]
    opts = opts_for(spec, flags)
    z, t, _ = make_block(n, v, scale, torch.float32, layout=layout)
    got, torch32, exact = (native_rows.stats(z, t, opts), rowwise.stats(z.clone(), t, opts),
                           rowwise.stats(z.double(), t, opts))  # rowwise.stats overwrites its block
    for name, a, b, ref in zip(("logprob", "entropy", "lse", "zmean"), got, torch32, exact):
        if a is None:
            continue
        assert a.dtype == torch.float32
        tol = 2 * max_err(b, ref) + 4e-7 * (1 + ref.abs().max().item())
        assert_close(a, ref, rtol=0, atol=tol, name=name)


GRADS = {"lp": (1, 0, 0, 0), "lp-lse": (1, 0, 1, 0), "ent": (0, 1, 0, 0), "all": (1, 1, 1, 1),
         "lse-zmean": (0, 0, 1, 1), "none": (0, 0, 0, 0)}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("grads", list(GRADS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_grad(case, grads, dtype, layout):
    n, v, scale, spec = CASES[case]
    opts = LogitOptions(with_entropy=True, **spec)
    block, t, g = make_block(n, v, scale, dtype, pad=5, layout=layout)  # NaN padding: must stay untouched
    z = block.clone()
    st = rowwise.stats(z.double().clone(), t, opts)   # (rowwise.stats overwrites its block)
    ups = upstream(n, g, torch.float64, GRADS[grads])
    want = rowwise.grad_(z.double().clone(), t, st.lse, st.entropy, *ups, opts)
    cast = [None if u is None else u.to(dtype) for u in ups]
    out = native_rows.grad_(block, t, st.lse.to(dtype), st.entropy.to(dtype), *cast, opts)
    assert out.data_ptr() == block.data_ptr() and out.stride() == block.stride(), "grad_ must work in place"
    assert torch.isnan(padding_of(block, layout)).all(), "grad_ wrote past the end of the block's rows"
    if dtype == torch.float64:
        assert_close(out, want, rtol=1e-11, atol=1e-12 * (1 + want.abs().max().item()), name="dz")
    else:  # the PyTorch kernels' own float32 error, from the same float32 statistics
        torch32 = rowwise.grad_(z.clone(), t, st.lse.float(), st.entropy.float(), *cast, opts)
        tol = 2 * max_err(torch32, want) + 1e-6 * (1 + want.abs().max().item())
        assert_close(out, want, rtol=0, atol=tol, name="dz")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("spec", [dict(temperature=0.05), dict(temperature=0.05, softcap=5e4)], ids=["T", "T-softcap"])
def test_grad_sees_the_tempered_logits_the_stats_saw(spec, layout):
    """Large tempered logits (|z/T| ~ 1e5, one-hot softmax rows): ∂lse/∂z = p/T sums to 1/T over each row
    only if the grad pass forms the same rounded x = z/T as the stats pass. Fused into an FMA with the
    unrounded product, p at the argmax came out 1.03 (silently wrong gradients at every T ≠ 1)."""
    opts = LogitOptions(with_entropy=True, **spec)
    block, t, g = make_block(16, 300, 5e3, torch.float32, layout=layout)
    st = native_rows.stats(block, t, opts)
    ones = torch.ones(16)
    dz = native_rows.grad_(block.clone(), t, st.lse, st.entropy, None, None, ones, None, opts)
    chain = 1 - torch.tanh(block.double() / spec["softcap"]) ** 2 if "softcap" in spec else 1.0  # ∂(c·tanh(z/c))/∂z
    p = dz.double() * spec["temperature"] / chain
    assert_close(p.sum(1), torch.ones(16, dtype=torch.float64), rtol=0, atol=1e-5, name="Σ_v p (from ∂lse/∂z)")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_in_a_row_stays_in_that_row(layout):
    opts = LogitOptions(with_entropy=True, with_zmean=True)
    z, t, _ = make_block(20, 1000, 3.0, torch.float32, layout=layout)
    z[2, 517] = float("nan")
    st = native_rows.stats(z, t, opts)
    others = [i for i in range(20) if i != 2]
    for name, s in zip(("logprob", "entropy", "lse", "zmean"), st):
        assert torch.isnan(s[2]), f"{name}: a NaN logit must give NaN"
        assert not torch.isnan(s[others]).any(), f"{name}: NaN leaked into other rows"


def test_grad_matches_autograd_of_stats():
    """The kernels' gradient is the derivative of their statistics (float64 autograd of plain torch)."""
    opts = LogitOptions(with_entropy=True, with_zmean=True, softcap=3.0, temperature=0.8)
    z, t, g = make_block(6, 777, 4.0, torch.float64)
    z = z.contiguous().requires_grad_()
    ups = upstream(6, g, torch.float64, (1, 1, 1, 1))
    x = opts.softcap * torch.tanh(z / opts.softcap) / opts.temperature
    logp = torch.log_softmax(x, dim=1)
    outs = (logp.gather(1, t[:, None]).squeeze(1), -(logp.exp() * logp).sum(1), torch.logsumexp(x, 1), x.mean(1))
    (auto,) = torch.autograd.grad(sum((o * u).sum() for o, u in zip(outs, ups)), z)
    st = native_rows.stats(z.detach(), t, opts)
    for name, a, b in zip(("logprob", "entropy", "lse", "zmean"), st, outs):
        assert_close(a, b, rtol=1e-12, name=name)
    got = native_rows.grad_(z.detach().clone(), t, st.lse, st.entropy, *ups, opts)
    assert_close(got, auto, rtol=1e-10, atol=1e-12, name="dz")


# ---------------------------------------------------------------------------------------------
# bad input: clear errors naming the argument
# ---------------------------------------------------------------------------------------------
def _stats_op(z, t, temperature=1.0, softcap=None):
    return torch.ops.alignfast.logprob_rows_stats(z, t, temperature, softcap, True, False)


def _grad_op(z, t, lse, entropy=None, g_lp=None, g_ent=None):
    return torch.ops.alignfast.logprob_rows_grad_(z, t, lse, entropy, g_lp, g_ent, None, None, 1.0, None)


BAD = {
    "z-1d": (lambda z, t, l: _stats_op(z[0], t), "z must be a 2-D"),
    "z-int": (lambda z, t, l: _stats_op(z.long(), t), "z must be float32 or float64"),
    "z-bf16": (lambda z, t, l: _stats_op(z.bfloat16(), t), "z must be float32 or float64"),
    "z-strided": (lambda z, t, l: _stats_op(torch.randn(8, 100)[::2, ::2], t), "contiguous along V"),
    "targets-int32": (lambda z, t, l: _stats_op(z, t.int()), "targets must be int64"),
    "targets-short": (lambda z, t, l: _stats_op(z, t[:-1]), "targets must be 1-D"),
    "targets-out-of-range": (lambda z, t, l: _stats_op(z, torch.full_like(t, 50)), "outside [0, V=50)"),
    "targets-negative": (lambda z, t, l: _stats_op(z, torch.full_like(t, -100)), "outside [0, V=50)"),
    "temperature": (lambda z, t, l: _stats_op(z, t, temperature=0.0), "temperature must be > 0"),
    "softcap": (lambda z, t, l: _stats_op(z, t, softcap=-1.0), "softcap must be a finite number > 0"),
    "softcap-inf": (lambda z, t, l: _stats_op(z, t, softcap=float("inf")), "softcap must be a finite number > 0"),
    "temperature-tiny": (lambda z, t, l: _stats_op(z, t, temperature=1e-320), "reciprocal finite"),
    # finite as a double, inf as z's float32: the output was all NaN
    "temperature-tiny-for-float32": (lambda z, t, l: _stats_op(z, t, temperature=1e-39), "reciprocal finite"),
    "softcap-huge-for-float32": (lambda z, t, l: _stats_op(z, t, softcap=1e39), "softcap must be a finite"),
    "z-rows-share-memory": (lambda z, t, l: _grad_op(z[:1].expand(4, 50), t, l), "more than one element"),
    # rows overlapping without a stride of 0, and a row input inside z: both were accepted, and wrong
    "z-rows-overlap": (lambda z, t, l: _grad_op(z.view(-1).as_strided((4, 50), (10, 1)), t, l),
                       "its rows must not overlap in memory"),
    "lse-inside-z": (lambda z, t, l: _grad_op(z, t, z.view(-1)[60:64]), "lse shares memory with the block"),
    "g_logprob-inside-z": (lambda z, t, l: _grad_op(z, t, l, g_lp=z[3, :4]), "g_logprob shares memory"),
    "lse-shape": (lambda z, t, l: _grad_op(z, t, l[:-1]), "lse must be 1-D"),
    "lse-dtype": (lambda z, t, l: _grad_op(z, t, l.double()), "lse must have z's dtype"),
    "g_logprob-shape": (lambda z, t, l: _grad_op(z, t, l, g_lp=l[None]), "g_logprob must be 1-D"),
    "g_entropy-without-entropy": (lambda z, t, l: _grad_op(z, t, l, g_ent=l), "entropy must be given"),
}


def test_stats_reads_any_layout_of_z():
    """stats never writes z: an expanded (stride-0) block is read as it is (it was refused as written-to)."""
    z, t, _ = make_block(4, 50, 1.0, torch.float32)
    got = native_rows.stats(z[:1].expand(4, 50), t, LogitOptions())
    want = native_rows.stats(z[:1].expand(4, 50).contiguous(), t, LogitOptions())
    assert all(torch.equal(a, b) for a, b in zip(got, want) if a is not None)


@pytest.mark.parametrize("bad", list(BAD))
def test_bad_input_raises_naming_the_argument(bad):
    fn, message = BAD[bad]
    z, t, _ = make_block(4, 50, 1.0, torch.float32)
    z = z.contiguous()
    lse = torch.randn(4)
    with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        fn(z, t, lse)


# ---------------------------------------------------------------------------------------------
# torch.compile traces through the ops (fake implementations, functionalised in-place grad)
# ---------------------------------------------------------------------------------------------
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    opts = LogitOptions(with_entropy=True, softcap=5.0)
    z, t, g = make_block(5, 300, 3.0, torch.float32)
    z = z.contiguous()
    g_lp, g_ent = torch.randn(5), torch.randn(5)

    def step(z, t, g_lp, g_ent):
        st = native_rows.stats(z, t, opts)
        dz = native_rows.grad_(z.clone(), t, st.lse, st.entropy, g_lp, g_ent, None, None, opts)
        return st.logprob, st.entropy, dz

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(z, t, g_lp, g_ent), step(z, t, g_lp, g_ent)):
        torch.testing.assert_close(got, want)
