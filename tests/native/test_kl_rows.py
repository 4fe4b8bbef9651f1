"""The native KL row kernels (`native_rows.kl_stats` / `kl_grad_`, csrc/kl_rows_cpu.cpp) against the
PyTorch row math they replace (`alignfast.ops.kl.TorchKLRows`) and float64 autograd: both directions,
temperatures, odd V, rows of the two blocks at different strides, NaN isolation, bad input."""
import pytest
import torch
from helpers import assert_close, max_err

from alignfast.ops import native_rows
from alignfast.ops.kl import KLOptions, TorchKLRows

pytestmark = pytest.mark.skipif(not native_rows.kl_available(),
                                reason="alignfast._C with the KL kernels is not built")

CASES = {"N13-V1000": (13, 1000, 3.0, 1.0), "N1-V4097-T0.7": (1, 4097, 3.0, 0.7), "N9-V7": (9, 7, 3.0, 1.0),
         "N3-V1": (3, 1, 3.0, 1.0), "N5-V2500-large": (5, 2500, 1e3, 1.3), "N40-V300": (40, 300, 3.0, 1.0)}


def blocks(n, v, scale, dtype, seed=0):
    """Policy and reference raw logits [n, v], views into NaN-padded storage of different row strides."""
    g = torch.Generator().manual_seed(seed)
    z = torch.full((n, v + 3), float("nan"), dtype=dtype)[:, :v]
    z_ref = torch.full((n, v + 5), float("nan"), dtype=dtype)[:, :v]
    z.copy_(torch.randn(n, v, generator=g, dtype=torch.float64) * scale)
    z_ref.copy_(z.double() + torch.randn(n, v, generator=g, dtype=torch.float64) * scale / 2)
    return z, z_ref, torch.randn(n, generator=g, dtype=torch.float64)


def torch_rows(z, z_ref, opts, g):
    """(kl, lse, ref_lse, dz) of the PyTorch row math, on copies."""
    kl, lse, ref_lse = TorchKLRows.stats(z.clone(), z_ref.clone(), opts)
    dz = TorchKLRows.grad_(z.clone(), z_ref.clone(), lse, ref_lse, kl, g.to(z.dtype), opts)
    return kl, lse, ref_lse, dz


def native(z, z_ref, opts, g):
    kl, lse, ref_lse = native_rows.kl_stats(z, z_ref, opts.temperature, opts.reverse)
    dz = native_rows.kl_grad_(z.clone(), z_ref, lse, ref_lse, kl, g.to(z.dtype), opts.temperature, opts.reverse)
    return kl, lse, ref_lse, dz


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("case", list(CASES))
def test_float64_matches_torch(case, reverse):
    n, v, scale, temperature = CASES[case]
    opts = KLOptions(temperature=temperature, reverse=reverse)
    z, z_ref, g = blocks(n, v, scale, torch.float64)
    before = (z.clone(), z_ref.clone())
    got = native(z, z_ref, opts, g)
    assert torch.equal(z, before[0]) and torch.equal(z_ref, before[1]), "stats must leave both blocks unchanged"
    for name, a, b in zip(("kl", "lse", "ref_lse", "dz"), got, torch_rows(z, z_ref, opts, g)):
        assert a.dtype == torch.float64
        # float64 rounding of logits of magnitude ~scale/T, amplified by e^{x − lse}'s cancellation
        assert_close(a, b, rtol=1e-11, atol=1e-12 * (1 + scale) * (1 + b.abs().max().item()), name=name)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_grad_sees_the_tempered_logits_the_stats_saw(reverse):
    """T = 0.05 on logits ~1e3 (one-hot rows): the grad pass must form the same rounded z/T as the stats
    pass; fused into an FMA with the unrounded product, the gradient was off by ~0.2 where it is ~0."""
    z, z_ref, g = blocks(8, 300, 1e3, torch.float32, seed=3)
    z_ref.copy_(z + torch.randn(z.shape, generator=torch.Generator().manual_seed(4)) * 0.5)
    kl, lse, ref_lse = native_rows.kl_stats(z, z_ref, 0.05, reverse)
    dz = native_rows.kl_grad_(z.clone(), z_ref, lse, ref_lse, kl, g.float(), 0.05, reverse)
    z64, r64 = z.double().requires_grad_(), z_ref.double()
    lp, lq = torch.log_softmax(z64 / 0.05, -1), torch.log_softmax(r64 / 0.05, -1)
    kl64 = (lq.exp() * (lq - lp)).sum(-1) if reverse else (lp.exp() * (lp - lq)).sum(-1)
    (want,) = torch.autograd.grad((kl64 * g).sum(), z64)
    assert_close(dz, want, rtol=0, atol=1e-3, name="dz")


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grad_into_ref_leaves_z_and_writes_the_same_gradient(dtype, reverse):
    """into_ref: the gradient lands in z_ref's memory (a fused loss forms its own gradient in z meanwhile)."""
    z, z_ref, g = blocks(7, 301, 3.0, dtype)
    kl, lse, ref_lse = native_rows.kl_stats(z, z_ref, 0.9, reverse)
    in_place = native_rows.kl_grad_(z.clone(), z_ref, lse, ref_lse, kl, g.to(dtype), 0.9, reverse)
    z_before = z.clone()
    out = native_rows.kl_grad_(z, z_ref, lse, ref_lse, kl, g.to(dtype), 0.9, reverse, into_ref=True)
    assert out.data_ptr() == z_ref.data_ptr() and torch.equal(z, z_before)
    assert torch.equal(out, in_place)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("case", list(CASES))
def test_float32_within_2x_of_torch(case, reverse):
    """fp32 against float64: no worse than twice the PyTorch row math's own fp32 error (+ slack)."""
    n, v, scale, temperature = CASES[case]
    opts = KLOptions(temperature=temperature, reverse=reverse)
    z, z_ref, g = blocks(n, v, scale, torch.float32)
    exact = torch_rows(z.double(), z_ref.double(), opts, g)
    got, torch32 = native(z, z_ref, opts, g), torch_rows(z, z_ref, opts, g)
    for name, a, b, ref in zip(("kl", "lse", "ref_lse", "dz"), got, torch32, exact):
        tol = 2 * max_err(b, ref) + 1e-6 * (1 + ref.abs().max().item())
        assert_close(a, ref, rtol=0, atol=tol, name=name)


def test_grad_is_the_derivative_of_kl():
    """Independent of the PyTorch row math: float64 autograd of log_softmax on the same blocks."""
    z, z_ref, g = blocks(6, 777, 4.0, torch.float64)
    for reverse in (False, True):
        opts = KLOptions(temperature=0.8, reverse=reverse)
        x = (z.detach().clone() / 0.8).requires_grad_()
        lp, lq = x.log_softmax(-1), (z_ref / 0.8).log_softmax(-1)
        kl = (lq.exp() * (lq - lp)).sum(-1) if reverse else (lp.exp() * (lp - lq)).sum(-1)
        (dx,) = torch.autograd.grad((kl * g).sum(), x)
        got = native(z, z_ref, opts, g)
        assert_close(got[0], kl, rtol=1e-12, name="kl")
        assert_close(got[3], dx / 0.8, rtol=1e-10, atol=1e-13, name="dz")


def test_nan_in_a_row_stays_in_that_row():
    z, z_ref, g = blocks(5, 1000, 3.0, torch.float32)
    z_ref[3, 417] = float("nan")
    kl, lse, ref_lse, dz = native(z, z_ref, KLOptions(), g)
    assert torch.isnan(kl[3]) and torch.isnan(ref_lse[3]) and torch.isnan(dz[3]).any()
    others = [0, 1, 2, 4]
    assert torch.isfinite(kl[others]).all() and torch.isfinite(dz[others]).all()


BAD = {
    "z-1d": (lambda z, r, v: native_rows.kl_stats(z[0], r[0], 1.0, False), "z must be a 2-D"),
    "z-bf16": (lambda z, r, v: native_rows.kl_stats(z.bfloat16(), r.bfloat16(), 1.0, False), "z must be float32"),
    "z-strided": (lambda z, r, v: native_rows.kl_stats(z.t().contiguous().t(), r, 1.0, False), "z must be contiguous"),
    "ref-shape": (lambda z, r, v: native_rows.kl_stats(z, r[:, :-1], 1.0, False), "z_ref must have z's shape"),
    "ref-dtype": (lambda z, r, v: native_rows.kl_stats(z, r.double(), 1.0, False), "z_ref must have z's dtype"),
    "temperature": (lambda z, r, v: native_rows.kl_stats(z, r, 0.0, False), "temperature must be > 0"),
    "lse-shape": (lambda z, r, v: torch.ops.alignfast.kl_rows_grad_(z, r, v[:-1], v, v, v, 1.0, False),
                  "lse must be 1-D"),
    "g-dtype": (lambda z, r, v: torch.ops.alignfast.kl_rows_grad_(z, r, v, v, v, v.double(), 1.0, False),
                "g must have z's dtype"),
    "z-rows-share-memory": (lambda z, r, v: torch.ops.alignfast.kl_rows_grad_(z[:1].expand(4, 50), r, v, v, v, v,
                                                                               1.0, False), "more than one element"),
    "z-rows-overlap": (lambda z, r, v: torch.ops.alignfast.kl_rows_grad_(z.view(-1).as_strided((4, 50), (10, 1)), r,
                                                                          v, v, v, v, 1.0, False), "must not overlap"),
    "kl-inside-z": (lambda z, r, v: torch.ops.alignfast.kl_rows_grad_(z, r, v, v, z[2, :4], v, 1.0, False),
                    "kl shares memory with the block"),
    "g-inside-ref-written": (lambda z, r, v: torch.ops.alignfast.kl_rows_grad_(z, r, v, v, v, r[1, :4], 1.0, False,
                                                                                True), "g shares memory"),
    "ref-partly-z": (lambda z, r, v: torch.ops.alignfast.kl_rows_grad_(z[:, :49], z[:, 1:], v, v, v, v, 1.0, False),
                     "z_ref shares memory with z"),
}


@pytest.mark.parametrize("bad", list(BAD))
def test_bad_input_raises_naming_the_argument(bad):
    fn, message = BAD[bad]
    z, r = torch.randn(4, 50), torch.randn(4, 50)
    with pytest.raises(RuntimeError, match=message):
        fn(z, r, torch.randn(4))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    z, z_ref, g = blocks(5, 300, 3.0, torch.float32)
    z, z_ref, g = z.contiguous(), z_ref.contiguous(), g.float()

    def step(z, z_ref, g):
        kl, lse, ref_lse = native_rows.kl_stats(z, z_ref, 0.9, False)
        return kl, native_rows.kl_grad_(z.clone(), z_ref, lse, ref_lse, kl, g, 0.9, False)

    want = step(z, z_ref, g)
    got = torch.compile(step, fullgraph=True)(z, z_ref, g)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
