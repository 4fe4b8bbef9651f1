"""The Triton kernels of linear_logprobs (`alignfast.kernels.logprobs`) against a float64
computation of the same function. On CPU-only machines they run in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1), so shapes stay small."""
import itertools

import pytest
import torch
from helpers import assert_close, max_err

import alignfast
from alignfast.dispatch import backends
from alignfast.ops.logprobs import reference_stats
from alignfast.ops.options import LogitOptions

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif("triton" not in backends(DEVICE), reason=f"no triton backend on {DEVICE}")

if "triton" in backends(DEVICE):
    from alignfast.kernels import logprobs as K

    # Tiles far smaller than the shapes: several token, vocab and H blocks, partial groups.
    SMALL = K.BlockConfig(block_n=16, block_v=256, block_h=16, num_warps=4, num_stages=1, group_n=4)
else:
    K = SMALL = None

SHAPES = {"N1-H16-V1000": (1, 16, 1000), "N37-H33-V4097": (37, 33, 4097), "N130-H16-V1000": (130, 16, 1000)}


def make_inputs(n, h, v, *, dtype=torch.float32, bias=True, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64) * scale
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    upstream = [torch.randn(n, generator=g, dtype=torch.float64) for _ in range(4)]
    cast = [None if t is None else t.to(dtype) for t in (hidden, weight, b)]
    return cast, targets, upstream


def exact(hidden, weight, bias, targets, opts, upstream, dtype=torch.float64):
    """Statistics and the gradients of Σ upstream·statistics, by naive autograd in `dtype` inputs."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (hidden, weight, bias) if t is not None]
    b = leaves[2] if bias is not None else None
    st = reference_stats(leaves[0], leaves[1], b, targets, opts, ignore_index=-100)
    loss = sum((s.double() * u).sum() for s, u in zip(st, upstream) if s is not None and u is not None)
    grads = torch.autograd.grad(loss, leaves)
    return st, (*grads, None) if bias is None else grads


def kernels(hidden, weight, bias, targets, opts, upstream, needs=(True, True, True), config=None):
    """Forward and backward kernels on DEVICE; upstream gradients in the output dtype (None stays None)."""
    dev = [None if t is None else t.to(DEVICE) for t in (hidden, weight, bias)]
    tg = targets.to(DEVICE)
    st = K.forward(*dev, tg, opts, config=config)
    grads = [None if u is None else u.to(DEVICE, st.lse.dtype) for u in upstream]
    if not opts.with_entropy:
        grads[1] = None
    if not opts.with_zmean:
        grads[3] = None
    return st, K.backward(*dev, tg, st.lse, st.entropy, grads, opts, needs, config=config)


def check(st, grads, ref_st, ref_grads, opts, *, rtol=1e-5):
    names = ("logprob", "entropy", "lse", "zmean")
    wanted = (True, opts.with_entropy, True, opts.with_zmean)
    for name, a, e, want in zip(names, st, ref_st, wanted):
        assert (a is not None) == want, name
        if want:
            assert a.shape == e.shape, name
            assert_close(a, e, rtol=rtol, name=name)
    for name, a, e in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, ref_grads):
        assert (a is None) == (e is None), name
        if a is not None:
            assert_close(a, e, rtol=rtol, name=name)


ALL_ON = dict(temperature=0.7, softcap=2.5, with_entropy=True, with_zmean=True)


@pytest.mark.parametrize("config", ["default", "small-tiles"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_fp32_matches_float64(shape, config, poison_empty):
    (hidden, weight, bias), targets, upstream = make_inputs(*SHAPES[shape])
    opts = LogitOptions(backend="triton", **ALL_ON)
    cfg = SMALL if config == "small-tiles" else None
    st, grads = kernels(hidden, weight, bias, targets, opts, upstream, config=cfg)
    ref_st, ref_grads = exact(hidden, weight, bias, targets, opts, upstream)
    assert st.lse.dtype == torch.float32 and grads[0].dtype == torch.float32
    check(st, grads, ref_st, ref_grads, opts)


FLAGS = list(itertools.product([False, True], repeat=5))
FLAG_IDS = ["-".join(n for n, on in zip(("bias", "softcap", "T0.7", "entropy", "zmean"), f) if on) or "plain"
            for f in FLAGS]


@pytest.mark.parametrize("bias,softcap,temp,entropy,zmean", FLAGS, ids=FLAG_IDS)
def test_every_flag_combination(bias, softcap, temp, entropy, zmean, poison_empty):
    (hidden, weight, b), targets, upstream = make_inputs(37, 33, 1000, bias=bias, seed=1)
    opts = LogitOptions(backend="triton", temperature=0.7 if temp else 1.0, softcap=1.5 if softcap else None,
                        with_entropy=entropy, with_zmean=zmean)
    st, grads = kernels(hidden, weight, b, targets, opts, upstream)
    ref_st, ref_grads = exact(hidden, weight, b, targets, opts, upstream)
    check(st, grads, ref_st, ref_grads, opts)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True),
                                   (True, True, False)], ids=["hidden", "weight", "bias", "hidden-weight"])
def test_only_needed_gradients(needs):
    (hidden, weight, bias), targets, upstream = make_inputs(37, 16, 1000, seed=2)
    opts = LogitOptions(backend="triton", **ALL_ON)
    st, grads = kernels(hidden, weight, bias, targets, opts, upstream, needs=needs)
    _, ref_grads = exact(hidden, weight, bias, targets, opts, upstream)
    for need, a, e in zip(needs, grads, ref_grads):
        assert (a is not None) == need
        if need:
            assert_close(a, e, rtol=1e-5)


@pytest.mark.parametrize("present", [(True, False, False, False), (False, False, True, False),
                                     (False, True, False, False), (False, False, False, True)],
                         ids=["logprob", "lse", "entropy", "zmean"])
def test_missing_upstream_gradients_are_zero(present):
    (hidden, weight, bias), targets, upstream = make_inputs(20, 16, 1000, seed=3)
    upstream = [u if p else None for u, p in zip(upstream, present)]
    opts = LogitOptions(backend="triton", **ALL_ON)
    _, grads = kernels(hidden, weight, bias, targets, opts, upstream)
    _, ref_grads = exact(hidden, weight, bias, targets, opts, [u if u is not None else 0.0 for u in upstream])
    for a, e in zip(grads, ref_grads):
        assert_close(a, e, rtol=1e-5)


def test_float64_inputs_compute_in_float64():
    (hidden, weight, bias), targets, upstream = make_inputs(37, 33, 1000, dtype=torch.float64, seed=4)
    opts = LogitOptions(backend="triton", **ALL_ON)
    st, grads = kernels(hidden, weight, bias, targets, opts, upstream)
    ref_st, ref_grads = exact(hidden, weight, bias, targets, opts, upstream)
    assert st.logprob.dtype == torch.float64 and grads[1].dtype == torch.float64
    check(st, grads, ref_st, ref_grads, opts, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_within_twice_naive_error(dtype, poison_empty):
    """Not worse than twice what naive PyTorch in the same dtype gets against float64."""
    (hidden, weight, bias), targets, upstream = make_inputs(37, 64, 1000, dtype=dtype, seed=5)
    opts = LogitOptions(backend="triton", **ALL_ON)
    st, grads = kernels(hidden, weight, bias, targets, opts, upstream)
    naive_st, naive_grads = exact(hidden, weight, bias, targets, opts, upstream, dtype=dtype)
    exact_st, exact_grads = exact(hidden, weight, bias, targets, opts, upstream)
    assert st.logprob.dtype == torch.float32
    assert grads[0].dtype == grads[1].dtype == grads[2].dtype == dtype
    names = ("logprob", "entropy", "lse", "zmean", "grad_hidden", "grad_weight", "grad_bias")
    for name, a, r, e in zip(names, [*st, *grads], [*naive_st, *naive_grads], [*exact_st, *exact_grads]):
        assert not torch.isnan(a).any(), name
        slack = 1e-6 * e.abs().max().item()
        assert max_err(a, e) <= 2 * max_err(r, e) + slack, \
            f"{name}: {max_err(a, e):.3e} vs naive {max_err(r, e):.3e}"


def test_large_logits_stay_finite(poison_empty):
    """|z| ≈ 1e4: finite everywhere, and within twice the error of naive fp32 PyTorch."""
    (hidden, weight, bias), targets, upstream = make_inputs(16, 16, 1000, scale=3e3, seed=6)
    opts = LogitOptions(backend="triton", with_entropy=True, with_zmean=True)
    st, grads = kernels(hidden, weight, bias, targets, opts, upstream)
    assert (hidden @ weight.t()).abs().max() > 5e3
    naive_st, naive_grads = exact(hidden, weight, bias, targets, opts, upstream, dtype=torch.float32)
    exact_st, exact_grads = exact(hidden, weight, bias, targets, opts, upstream)
    for a, r, e in zip([*st, *grads], [*naive_st, *naive_grads], [*exact_st, *exact_grads]):
        assert torch.isfinite(a).all()
        assert max_err(a, e) <= 2 * max_err(r, e) + 1e-6 * e.abs().max().item()


def test_strided_inputs():
    (hidden, weight, bias), targets, upstream = make_inputs(24, 16, 1000, seed=7)
    hidden_t = hidden.t().contiguous().t()  # column-major
    weight_nc = torch.stack([weight, -weight], dim=2).flatten(1)[:, ::2]  # inner stride 2
    opts = LogitOptions(backend="triton", **ALL_ON)
    st, grads = kernels(hidden_t, weight_nc, bias, targets, opts, upstream)
    check(st, grads, *exact(hidden, weight, bias, targets, opts, upstream), opts)


def test_forward_backward_with_bounds():
    (hidden, weight, bias), targets, upstream = make_inputs(30, 16, 1000, seed=8)
    opts = LogitOptions(backend="triton", **ALL_ON)
    dev = [t.to(DEVICE) for t in (hidden, weight, bias)]
    calls = []

    def up(st):  # per-range upstream, as a fused loss computes it: here g = stat² on logprob, 1 on lse
        calls.append(st.logprob.shape[0])
        return 2 * st.logprob, None, torch.ones_like(st.lse), None

    st, grads = K.forward_backward(*dev, targets.to(DEVICE), opts, up, (True, True, True),
                                   bounds=[(0, 7), (7, 30)])
    assert calls == [7, 23]
    ref_st = exact(hidden, weight, bias, targets, opts, upstream)[0]
    _, ref_grads = exact(hidden, weight, bias, targets, opts,
                         [2 * ref_st.logprob.detach(), None, torch.ones(30, dtype=torch.float64), None])
    check(st, grads, ref_st, ref_grads, opts)


@pytest.mark.parametrize("ignore", [0.4, 1.0], ids=["mixed-ignored", "all-ignored"])
def test_public_api_matches_reference(ignore, poison_empty):
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(3, 11, 33, generator=g)
    weight = torch.randn(1001, 33, generator=g) / 33**0.5
    bias = torch.randn(1001, generator=g)
    targets = torch.randint(0, 1001, (3, 11), generator=g)
    targets[torch.rand(3, 11, generator=g) < ignore] = -100
    upstream = [torch.randn(3, 11, generator=g, dtype=torch.float64) for _ in range(3)]

    def run(backend, dtype, device):
        leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (hidden, weight, bias)]
        out = alignfast.linear_logprobs(leaves[0], leaves[1], targets.to(device), leaves[2], temperature=1.3,
                                        softcap=3.0, return_entropy=True, return_lse=True, backend=backend)
        loss = sum((o.double() * u.to(device)).sum() for o, u in zip(out, upstream))
        return out, torch.autograd.grad(loss, leaves)

    out, grads = run("triton", torch.float32, DEVICE)
    ref_out, ref_grads = run("reference", torch.float64, "cpu")
    for name, a, e in zip(("logprobs", "entropy", "lse", "grad_hidden", "grad_weight", "grad_bias"),
                          [*out, *grads], [*ref_out, *ref_grads]):
        assert_close(a, e, rtol=1e-5, name=name)
    ignored = (targets == -100).to(DEVICE)
    for o in out:
        assert (o[ignored] == 0).all()
    assert (grads[0][ignored] == 0).all()


def test_dispatch_offers_triton_here():
    assert "triton" in alignfast.backends(DEVICE)
    assert alignfast.dispatch.resolve("triton", torch.device(DEVICE)) == "triton"


def spread_rows(x: torch.Tensor, stride: int) -> torch.Tensor:
    """x [R, C] copied into rows `stride` elements apart: a view whose last row lies past 2³¹ elements,
    in mostly untouched (hence unbacked) memory."""
    base = torch.empty((x.shape[0] - 1) * stride + x.shape[1], dtype=x.dtype, device=DEVICE)
    return base.as_strided(x.shape, (stride, 1)).copy_(x)


@pytest.mark.parametrize("operand", ["hidden", "weight"])
def test_offsets_past_2_31_elements(operand):
    """Element offsets ≥ 2³¹ (long batches: N·H ≥ 2³¹) index in int64, not wrapped int32 (which read
    outside the tensor: a crash or garbage)."""
    (hidden, weight, bias), targets, upstream = make_inputs(3, 16, 300, seed=9)
    opts = LogitOptions(backend="triton", **ALL_ON)
    far = dict(hidden=hidden, weight=weight)
    far[operand] = spread_rows(far[operand].to(DEVICE), 2**31 // (far[operand].shape[0] - 1) + 16)
    assert K._flags(far["hidden"], far["weight"])["INDEX64"]
    assert not K._flags(hidden, weight)["INDEX64"]
    st, grads = kernels(far["hidden"], far["weight"], bias, targets, opts, upstream)
    check(st, grads, *exact(hidden, weight, bias, targets, opts, upstream), opts)


def test_offsets_past_2_31_elements_along_h():
    """A transposed operand (unit row stride, a huge stride along H): (H−1)·stride ≥ 2³¹ needs the H
    index in int64 too, not only rows and columns."""
    (hidden, weight, bias), targets, upstream = make_inputs(3, 16, 300, seed=10)
    opts = LogitOptions(backend="triton", **ALL_ON)
    stride = 2**31 // (weight.shape[1] - 1) + 16
    base = torch.empty((weight.shape[1] - 1) * stride + weight.shape[0], dtype=weight.dtype, device=DEVICE)
    far = base.as_strided(weight.shape, (1, stride)).copy_(weight)
    assert K._flags(hidden, far)["INDEX64"]
    st, grads = kernels(hidden, far, bias, targets, opts, upstream)
    check(st, grads, *exact(hidden, weight, bias, targets, opts, upstream), opts)


def test_float_options_reach_the_kernels_in_the_accumulation_dtype():
    """A Python float kernel argument is compiled as fp32: softcap, 1/temperature and the filter eps
    go in a tensor of the accumulation dtype instead, so fp64 inputs stay exact on a GPU too."""
    from alignfast.kernels import kl as KL
    from alignfast.ops.kl import KLOptions

    h = torch.randn(4, 8, dtype=torch.float64)
    args = K._common_args(h, h, LogitOptions(backend="triton", temperature=0.7, softcap=3.0, grad_filter_eps=1e-9))
    kl_args = KL._common_args(h, h, h, h, KLOptions(temperature=0.7))
    for a in (*args, *kl_args):
        assert not isinstance(a, float)
    assert args[7].dtype == kl_args[12].dtype == torch.float64
    assert args[7].tolist() == [3.0, 1 / 0.7, 1e-9] and kl_args[12].tolist() == [1 / 0.7]


@pytest.mark.parametrize("op", ["logprobs", "kl"])
def test_autotuning_keeps_the_forward_statistics(op, monkeypatch):
    """ALIGNFAST_AUTOTUNE=1 zeroes the gradients before each benchmarked run: an unneeded gradient's
    pointer must not alias the saved lse (it did: lse became 0 and every gradient was wrong)."""
    from triton.runtime import autotuner

    from alignfast.kernels import kl as KL
    from alignfast.ops.kl import KLOptions, reference_kl

    def bench_once(self):  # the interpreter has no GPU timer: run each config once, the first is fastest
        calls = []

        def bench(fn, quantiles=None, **kw):
            fn()
            calls.append(1)
            return [float(len(calls))] * 3
        return bench

    monkeypatch.setattr(autotuner.Autotuner, "do_bench", property(bench_once))
    monkeypatch.setattr(K, "autotune_enabled", lambda: True)
    monkeypatch.setattr(KL, "autotune_enabled", lambda: True)
    (hidden, weight, _), targets, upstream = make_inputs(6, 16, 40, seed=11)
    needs = (True, True, False)  # no bias: its gradient pointer is a stand-in
    if op == "logprobs":
        opts = LogitOptions(backend="triton")
        st, grads = kernels(hidden, weight, None, targets, opts, [upstream[0], None, None, None], needs)
        ref_st, ref_grads = exact(hidden, weight, None, targets, opts, [upstream[0], None, None, None])
        assert_close(st.lse, ref_st.lse, rtol=1e-5, name="lse")
    else:
        ref_h, ref_w = torch.randn(6, 16, dtype=torch.float64).float(), weight.flip(0)
        opts = KLOptions()
        stats = KL.forward(hidden, weight, None, ref_h, ref_w, None, opts)
        lse = stats.lse.clone()
        grads = KL.backward(hidden, weight, None, ref_h, ref_w, None, stats, upstream[0].float(), opts, needs)
        assert torch.equal(stats.lse, lse)
        leaves = [t.double().requires_grad_() for t in (hidden, weight)]
        kl = reference_kl(*leaves[:2], None, ref_h.double(), ref_w.double(), None, opts)
        ref_grads = torch.autograd.grad((kl * upstream[0]).sum(), leaves)
    for name, a, e in zip(("grad_hidden", "grad_weight"), grads, ref_grads):
        assert_close(a, e, rtol=1e-5, name=name)
