"""The CUDA kernels' own code (csrc/cuda/*.cu), run on the CPU through the CUDA emulator
(cuda_emulation.py): the row kernels against the PyTorch row kernels (`alignfast.ops.rowwise`),
GAE against the torch loop, the PPO/GRPO token pass against the CPU op. Checks indexing, the
head/pack/tail split of rows at every 16-byte alignment, the block reductions with idle threads and
several elements per thread, and that nothing is written outside a row. (Speed, coalescing and the
GPU memory model need a GPU: benchmarks/gpu_check.sh.)"""
import ctypes

import pytest
import torch
from cuda_emulation import build, compiler
from helpers import assert_close, max_err

from alignfast.ops import rowwise
from alignfast.ops.options import LogitOptions

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C++ compiler")

P, I64, F64, BOOL, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_bool, ctypes.c_int
SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


@pytest.fixture(scope="module")
def cuda(tmp_path_factory):
    lib = build(tmp_path_factory.mktemp("cuda-emulated"))
    for s in SUFFIX.values():
        getattr(lib, f"row_stats_{s}").argtypes = [P] * 6 + [I64] * 3 + [F64] * 2
        getattr(lib, f"row_grad_{s}").argtypes = [P] * 8 + [I64] * 3 + [F64] * 2
        getattr(lib, f"kl_stats_{s}").argtypes = [P] * 5 + [I64] * 4 + [F64, BOOL]
        getattr(lib, f"kl_grad_{s}").argtypes = [P] * 6 + [I64] * 4 + [F64, BOOL, BOOL]
        getattr(lib, f"gae_{s}").argtypes = [P] * 5 + [I64] * 2 + [F64] * 2
        getattr(lib, f"pg_token_{s}").argtypes = [P] * 11 + [I64] * 2 + [BOOL, P, INT]
    return lib


def ptr(t):
    return None if t is None else t.data_ptr()


CASES = {  # rows, V, scale of the logits, options
    "N5-V1000": (5, 1000, 3.0, {}),              # 250 packs: threads with one pack, threads with none
    "N3-V5003-T0.7": (3, 5003, 3.0, dict(temperature=0.7)),  # several packs per thread, a tail
    "N4-V2049-softcap": (4, 2049, 10.0, dict(softcap=2.5)),
    "N2-V777-softcap-T1.3": (2, 777, 10.0, dict(softcap=30.0, temperature=1.3)),
    "N3-V7": (3, 7, 3.0, {}),                    # fewer elements than one warp
    "N2-V1": (2, 1, 3.0, {}),
    "N3-V1500-large-logits": (3, 1500, 1e4, {}),
}
FLAGS = {"plain": (False, False), "entropy": (True, False), "zmean": (False, True), "both": (True, True)}


def make_block(n, v, scale, dtype, pad, seed=0):
    """Raw logits [n, v] as a view into a NaN-filled [n, v + pad] (pad = 1, 2, 3 puts the rows at
    every alignment mod 16 bytes), and targets [n]."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    targets = torch.randint(0, v, (n,), generator=g)
    full = torch.full((n, v + pad), float("nan"), dtype=dtype)
    return full[:, :v].copy_(z), targets, g


def stats(cuda, z, targets, opts):
    n, v = z.shape
    out = [z.new_empty(n) if want else None for want in (True, opts.with_entropy, True, opts.with_zmean)]
    launch = getattr(cuda, f"row_stats_{SUFFIX[z.dtype]}")
    err = launch(ptr(z), ptr(targets), *map(ptr, out), n, v, z.stride(0), opts.temperature,
                 opts.softcap or 0.0)
    assert err == 0, f"launch failed: cudaError {err}"
    return out


def grad_(cuda, z, targets, lse, entropy, ups, opts):
    n, v = z.shape
    launch = getattr(cuda, f"row_grad_{SUFFIX[z.dtype]}")
    err = launch(ptr(z), ptr(targets), ptr(lse), ptr(entropy), *map(ptr, ups), n, v, z.stride(0),
                 opts.temperature, opts.softcap or 0.0)
    assert err == 0, f"launch failed: cudaError {err}"
    return z


@pytest.mark.parametrize("pad", [0, 1, 3], ids=lambda p: f"pad{p}")
@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("case", list(CASES))
def test_stats(cuda, case, flags, pad):
    n, v, scale, spec = CASES[case]
    opts = LogitOptions(with_entropy=FLAGS[flags][0], with_zmean=FLAGS[flags][1], **spec)
    for dtype in (torch.float64, torch.float32):
        z, t, _ = make_block(n, v, scale, dtype, pad)
        before = z.clone()
        got = stats(cuda, z, t, opts)
        assert torch.equal(z, before), "stats must leave z unchanged"
        exact = rowwise.stats(z.double().clone(), t, opts)   # (rowwise.stats overwrites its block)
        torch32 = rowwise.stats(z.clone(), t, opts)
        for name, a, ref, b in zip(("logprob", "entropy", "lse", "zmean"), got, exact, torch32):
            assert (a is None) == (ref is None), name
            if a is None:
                continue
            if dtype == torch.float64:
                assert_close(a, ref, rtol=1e-12, atol=1e-12 * (1 + scale), name=name)
            else:
                tol = 2 * max_err(b, ref) + 4e-7 * (1 + ref.abs().max().item())
                assert_close(a, ref, rtol=0, atol=tol, name=name)


GRADS = {"lp": (1, 0, 0, 0), "ent": (0, 1, 0, 0), "all": (1, 1, 1, 1), "lse-zmean": (0, 0, 1, 1)}


@pytest.mark.parametrize("pad", [0, 2], ids=lambda p: f"pad{p}")
@pytest.mark.parametrize("grads", list(GRADS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_grad(cuda, case, grads, dtype, pad):
    n, v, scale, spec = CASES[case]
    opts = LogitOptions(with_entropy=True, **spec)
    block, t, g = make_block(n, v, scale, dtype, pad)
    z = block.clone()
    st = rowwise.stats(z.double().clone(), t, opts)   # (rowwise overwrites its block)
    ups = [torch.randn(n, generator=g, dtype=torch.float64) if on else None for on in GRADS[grads]]
    want = rowwise.grad_(z.double().clone(), t, st.lse, st.entropy, *ups, opts)
    cast = [None if u is None else u.to(dtype) for u in ups]
    out = grad_(cuda, block, t, st.lse.to(dtype), st.entropy.to(dtype), cast, opts)
    assert torch.isnan(block._base[:, v:]).all(), "grad wrote past the end of a row"
    if dtype == torch.float64:
        assert_close(out, want, rtol=1e-11, atol=1e-12 * (1 + want.abs().max().item()), name="dz")
    else:
        torch32 = rowwise.grad_(z.clone(), t, st.lse.float(), st.entropy.float(), *cast, opts)
        tol = 2 * max_err(torch32, want) + 1e-6 * (1 + want.abs().max().item())
        assert_close(out, want, rtol=0, atol=tol, name="dz")


def test_grad_is_the_derivative_of_the_stats(cuda):
    """Independent of the PyTorch row kernels: float64 autograd of plain torch on the same block."""
    opts = LogitOptions(with_entropy=True, with_zmean=True, softcap=3.0, temperature=0.8)
    z, t, g = make_block(4, 1301, 4.0, torch.float64, pad=1)
    leaf = z.detach().clone().requires_grad_()
    ups = [torch.randn(4, generator=g, dtype=torch.float64) for _ in range(4)]
    x = opts.softcap * torch.tanh(leaf / opts.softcap) / opts.temperature
    logp = torch.log_softmax(x, dim=1)
    outs = (logp.gather(1, t[:, None]).squeeze(1), -(logp.exp() * logp).sum(1), torch.logsumexp(x, 1),
            x.mean(1))
    (auto,) = torch.autograd.grad(sum((o * u).sum() for o, u in zip(outs, ups)), leaf)
    got = stats(cuda, z, t, opts)
    for name, a, b in zip(("logprob", "entropy", "lse", "zmean"), got, outs):
        assert_close(a, b, rtol=1e-12, name=name)
    assert_close(grad_(cuda, z, t, got[2], got[1], ups, opts), auto, rtol=1e-10, atol=1e-12, name="dz")


def test_nan_in_a_row_stays_in_that_row(cuda):
    opts = LogitOptions(with_entropy=True, with_zmean=True)
    z, t, _ = make_block(4, 1000, 3.0, torch.float32, pad=0)
    z[2, 517] = float("nan")
    for name, s in zip(("logprob", "entropy", "lse", "zmean"), stats(cuda, z, t, opts)):
        assert torch.isnan(s[2]), f"{name}: a NaN logit must give NaN"
        assert not torch.isnan(s[[0, 1, 3]]).any(), f"{name}: NaN leaked into other rows"


def test_empty_block_launches_nothing(cuda):
    """A grid of 0 blocks is a launch error on a GPU (and in the emulator): the launchers must skip it."""
    out = stats(cuda, torch.empty(0, 10), torch.empty(0, dtype=torch.long), LogitOptions(with_entropy=True))
    assert [o.shape for o in out if o is not None] == [(0,)] * 3
    assert cuda.row_grad_f32(None, None, None, None, None, None, None, None, 0, 10, 10, 1.0, 0.0) == 0
    assert cuda.gae_f32(None, None, None, None, None, 0, 5, 1.0, 1.0) == 0


# ---------------------------------------------------------------------------------------------
# KL row kernels (kl_rows.cu) against float64 torch on materialised log-softmaxes
# ---------------------------------------------------------------------------------------------
KL_CASES = {"N3-V1000": (3, 1000, 3.0, 1.0), "N2-V5003-T0.7": (2, 5003, 3.0, 0.7), "N3-V7": (3, 7, 3.0, 1.0),
            "N2-V1": (2, 1, 3.0, 1.0), "N2-V1500-large": (2, 1500, 1e3, 1.0)}


def kl_exact(z, z_ref, temperature, reverse, g):
    """(kl, lse, ref_lse, ∂(Σ g·kl)/∂z) by float64 autograd."""
    x = (z.double() / temperature).requires_grad_()
    y = z_ref.double() / temperature
    lp, lq = x.log_softmax(-1), y.log_softmax(-1)
    kl = (lq.exp() * (lq - lp)).sum(-1) if reverse else (lp.exp() * (lp - lq)).sum(-1)
    (dx,) = torch.autograd.grad((kl * g).sum(), x)
    return kl.detach(), x.detach().logsumexp(-1), y.logsumexp(-1), dx / temperature


@pytest.mark.parametrize("into_ref", [False, True], ids=["into-z", "into-ref"])
@pytest.mark.parametrize("pads", [(0, 0), (1, 1), (0, 3)], ids=["aligned", "same-misalignment", "mixed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("case", list(KL_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_kl_rows(cuda, case, reverse, pads, dtype, into_ref):
    n, v, scale, temperature = KL_CASES[case]
    z, _, g = make_block(n, v, scale, dtype, pads[0], seed=3)
    z_ref, _, _ = make_block(n, v, scale, dtype, pads[1], seed=4)
    up = torch.randn(n, generator=g, dtype=torch.float64)
    want_kl, want_lse, want_ref_lse, want_dz = kl_exact(z, z_ref, temperature, reverse, up)
    kl, lse, ref_lse = (z.new_full((n,), float("nan")) for _ in range(3))
    s = SUFFIX[dtype]
    args = (n, v, z.stride(0), z_ref.stride(0), temperature, reverse)
    assert getattr(cuda, f"kl_stats_{s}")(*map(ptr, (z, z_ref, kl, lse, ref_lse)), *args) == 0
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert_close(kl, want_kl, rtol=tol, atol=tol * (1 + want_kl.abs().max().item()), name="kl")
    assert_close(lse, want_lse, rtol=tol, name="lse")
    assert_close(ref_lse, want_ref_lse, rtol=tol, name="ref_lse")
    kept, out = (z, z_ref) if into_ref else (z_ref, z)
    before = kept.clone()
    assert getattr(cuda, f"kl_grad_{s}")(*map(ptr, (z, z_ref, lse, ref_lse, kl, up.to(dtype))), *args, into_ref) == 0
    assert torch.equal(kept, before), "the block not written is read only"
    assert torch.isnan(out._base[:, v:]).all(), "grad wrote past the end of a row"
    assert_close(out, want_dz, rtol=0, atol=tol * (1 + want_dz.abs().max().item()), name="dz")


# ---------------------------------------------------------------------------------------------
# GAE (one thread per row: 130 rows are two blocks, the second mostly threads that exit at once)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("b, t, holes", [(4, 33, 0.3), (1, 1, 0.0), (130, 17, 0.5), (2, 9, 1.0)])
def test_gae(cuda, b, t, holes, dtype):
    gae_torch = pytest.importorskip("alignfast.losses.gae")._gae_torch
    g = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(b, t, generator=g, dtype=dtype), torch.randn(b, t, generator=g, dtype=dtype)
    valid = torch.rand(b, t, generator=g) >= holes
    adv, ret = (torch.full((b, t), float("nan"), dtype=dtype) for _ in range(2))
    launch = getattr(cuda, f"gae_{SUFFIX[dtype]}")
    assert launch(*map(ptr, (rewards, values, valid, adv, ret)), b, t, 0.99, 0.95) == 0
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    want = gae_torch(rewards, values, valid, 0.99, 0.95, dtype)
    for name, a, w in zip(("advantages", "returns"), (adv, ret), want):
        assert_close(a, w, rtol=tol, atol=tol, name=name)


# ---------------------------------------------------------------------------------------------
# PPO/GRPO token pass: the grid-stride launch around the per-token math the CPU op shares
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_tokens", [1, 300, 2049])
@pytest.mark.parametrize("variant", ["ppo-k3", "dual-clamp-k1", "on-policy-per-row"])
def test_pg_token(cuda, variant, n_tokens):
    steps = 7 if n_tokens > 1 else 1
    rows = max(1, n_tokens // steps)
    g = torch.Generator().manual_seed(2)
    logp = -torch.rand(rows, steps, generator=g, dtype=torch.float64) * 3
    old = logp + 0.3 * torch.randn(rows, steps, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(rows, steps, generator=g, dtype=torch.float64)
    per_row = variant == "on-policy-per-row"
    adv = torch.randn(rows if per_row else (rows, steps), generator=g, dtype=torch.float64)
    valid = torch.rand(rows, steps, generator=g) > 0.2
    old = None if per_row else old
    dual, clamp, est = {"ppo-k3": (None, None, "k3"), "dual-clamp-k1": (3.0, 0.2, "k1"),
                        "on-policy-per-row": (None, None, "k2")}[variant]
    if not hasattr(torch.ops.alignfast, "pg_token_loss"):
        pytest.skip("alignfast._C is not built")
    want = torch.ops.alignfast.pg_token_loss(logp, old, ref, adv, valid, 0.8, 1.28, dual, clamp, est, 0.05)
    outs = [torch.full((rows, steps), float("nan"), dtype=torch.float64) for _ in range(5)]
    flags = torch.full((rows, steps), 255, dtype=torch.uint8)
    options = torch.tensor([0.8, 1.28, dual or 0.0, clamp or 0.0, 0.05], dtype=torch.float64)
    err = cuda.pg_token_f64(*map(ptr, (logp, old, ref, adv, valid, *outs, flags)), rows, steps, per_row,
                            ptr(options), {"k1": 1, "k2": 2, "k3": 3}[est])
    assert err == 0
    for name, a, w in zip(("loss", "dloss", "ratio", "approx_kl", "kl", "flags"), outs + [flags], want):
        if name == "flags":
            assert torch.equal(a, w), name
        else:
            assert_close(a, w, rtol=1e-13, atol=1e-15, name=name)
