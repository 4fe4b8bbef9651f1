"""The fused PPO/GRPO token pass (alignfast.losses.pg_token) on every backend here (torch, Triton,
cpp; cuda and Triton on a GPU) against a token-by-token float64 re-derivation with hand-written
gradients: per-token terms, then ppo_policy_loss / grpo_loss end to end (values, metrics, ∂/∂logp)."""
import math
import os

import torch

if not torch.cuda.is_available():  # the Triton interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from helpers import assert_close  # noqa: E402

from alignfast import dispatch  # noqa: E402
from alignfast.losses import grpo_loss, ppo_policy_loss  # noqa: E402
from alignfast.losses.pg_token import (CLIP_HIGH, CLIP_LOW, CLIPPED, DUAL_CLIPPED, TokenLossOptions,  # noqa: E402
                                       _has_native, pg_token_terms, resolve_backend)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NATIVE = {"cpu": "cpp", "cuda": "cuda"}[DEVICE]
BACKENDS = (["torch"] + (["triton"] if "triton" in dispatch.backends(DEVICE) else [])
            + ([NATIVE] if _has_native(torch.device(DEVICE)) else []))
FP64, FP32 = torch.float64, torch.float32


# ---------------------------------------------------------------------------------------------
# the oracle: one token at a time, in Python floats (float64), gradients derived by hand
# ---------------------------------------------------------------------------------------------
def oracle_token(lp, old, ref, a, *, lo, hi, dual, clamp, est, coef):
    """(l, ∂l/∂lp, ratio, approx_kl, kl | None, flags) of one valid token."""
    lr = 0.0 if old is None else lp - old
    dlr = 1.0
    if clamp is not None:
        dlr = 1.0 if -clamp <= lr <= clamp else 0.0
        lr = min(max(lr, -clamp), clamp)
    r = math.exp(lr)
    unclipped, clipped = -a * r, -a * min(max(r, lo), hi)
    if clipped > unclipped:  # the clipped branch: constant in lp
        loss, grad, flags = clipped, 0.0, CLIPPED
    else:
        loss, grad, flags = unclipped, -a * r * dlr, 0
    flags |= (CLIP_LOW if r < lo and a < 0 else 0) | (CLIP_HIGH if r > hi and a > 0 else 0)
    if dual is not None and a < 0 and loss > -dual * a:
        loss, grad, flags = -dual * a, 0.0, flags | DUAL_CLIPPED
    kl = None
    if ref is not None:
        d = lp - ref
        kl, dkl = {"k1": (d, 1.0), "k2": (0.5 * d * d, d), "k3": (math.expm1(-d) + d, -math.expm1(-d))}[est]
        loss, grad = loss + coef * kl, grad + coef * dkl
    return loss, grad, r, math.expm1(lr) - lr, kl, flags


def oracle_terms(logp, old, ref, adv, mask, **opts):
    """[B, T] float64 tensors (int for flags) of every per-token output, 0 where masked."""
    B, T = logp.shape
    out = {k: torch.zeros(B, T, dtype=FP64) for k in ("loss", "grad", "ratio", "approx_kl", "kl")}
    out["flags"] = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            a = float(adv[b] if adv.dim() == 1 else adv[b, t])
            res = oracle_token(float(logp[b, t]), None if old is None else float(old[b, t]),
                               None if ref is None else float(ref[b, t]), a, **opts)
            for key, value in zip(("loss", "grad", "ratio", "approx_kl", "kl", "flags"), res):
                if value is not None:
                    out[key][b, t] = value
    return out


def weights(mask, mode, max_len=None):
    """∂(reduced loss)/∂l_t per token for each reduction, and the reduced loss as a function of l."""
    m = mask.to(FP64)
    B, T = m.shape
    n_b = m.sum(-1).clamp(min=1)
    w = {"token-mean": m / m.sum().clamp(min=1), "seq-mean-token-sum": m / B,
         "seq-mean-token-mean": m / (n_b[:, None] * B)}
    w.update(dapo=w["token-mean"], bnpo=w["token-mean"], grpo=w["seq-mean-token-mean"],
             dr_grpo=m / (B * (max_len or T)))
    return w[mode]


def make_inputs(B, T, dtype, seed, *, seq_adv=False, ties=True, spike=True, clamp_edges=False, masked_row=True):
    """Random rollout tensors with ties (ρ = 1 exactly, A = 0 exactly), a token with ρ ≈ 4.5 and A < 0
    (dual clip), an all-masked row whose entries are poisoned (NaN / −inf) and, with `clamp_edges`,
    log-ratios on and beyond PPO's clamp of ±20."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=FP64) * 4
    logp = old + torch.randn(B, T, generator=g, dtype=FP64) * 0.4
    ref = old + torch.randn(B, T, generator=g, dtype=FP64) * 0.3
    adv = torch.randn((B,) if seq_adv else (B, T), generator=g, dtype=FP64)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[:, 0] = True
    logp, old, ref, adv = (x.to(dtype).to(FP64) for x in (logp, old, ref, adv))  # representable in dtype
    if ties and T > 1:
        old[0, :2] = logp[0, :2]  # ρ = 1 exactly: on the clip boundary when ε = 0
        ref[0, 1] = logp[0, 1]
        if not seq_adv:
            adv[0, 1] = 0.0
    if spike:
        old[B - 1, 0] = logp[B - 1, 0] - 1.5
        idx = (B - 1,) if seq_adv else (B - 1, 0)
        adv[idx] = -abs(float(adv[idx])) - 0.1
    if clamp_edges and T > 3:
        logp[0, 2], old[0, 2] = -1.0, -21.0  # log ρ = 20 exactly: the clamp's edge (gradient kept)
        logp[0, 3], old[0, 3] = -0.5, -30.5  # log ρ = 30: clamped (no gradient through ρ)
        mask[0, 2:4] = True
    if masked_row and B > 1:
        mask[B // 2] = False
        for x in (logp, old, ref, adv):
            x[B // 2] = float("nan")
        logp[B // 2, 0] = float("-inf")
    return logp, old, ref, adv, mask


def dev(*xs, dtype):
    return [None if x is None else x.to(dtype).to(DEVICE) for x in xs]


def rtol_for(dtype):
    return 1e-10 if dtype == FP64 else 2e-5


# ---------------------------------------------------------------------------------------------
# per-token terms
# ---------------------------------------------------------------------------------------------
TERM_CASES = {  # name: (B, T, seq_adv, oracle options, with old, with ref)
    "ppo-B4-T9": (4, 9, False, dict(lo=0.8, hi=1.2, dual=None, clamp=20.0, est="k1", coef=0.0), True, False),
    "ppo-dual3-high0.28-k3-B5-T7": (5, 7, False, dict(lo=0.8, hi=1.28, dual=3.0, clamp=20.0, est="k3", coef=0.1),
                                    True, True),
    "ppo-eps0-ties-k2-B3-T6-seqadv": (3, 6, True, dict(lo=1.0, hi=1.0, dual=None, clamp=20.0, est="k2", coef=0.05),
                                      True, True),
    "grpo-k3-B4-T8-seqadv": (4, 8, True, dict(lo=0.8, hi=1.2, dual=None, clamp=None, est="k3", coef=0.04), True, True),
    "grpo-on-policy-B3-T5": (3, 5, True, dict(lo=0.8, hi=1.28, dual=None, clamp=None, est="k3", coef=0.0), False, True),
    "B1-T1": (1, 1, False, dict(lo=0.8, hi=1.2, dual=1.5, clamp=20.0, est="k1", coef=0.2), True, True),
    "B1-T1030": (1, 1030, False, dict(lo=0.9, hi=1.1, dual=2.0, clamp=20.0, est="k3", coef=0.1), True, True),
    "B3-T1-seqadv": (3, 1, True, dict(lo=0.8, hi=1.2, dual=None, clamp=None, est="k3", coef=0.1), True, True),
    "B2-T1100-on-policy": (2, 1100, True, dict(lo=0.8, hi=1.2, dual=None, clamp=None, est="k2", coef=0.0),
                           False, False),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [FP64, FP32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", list(TERM_CASES))
def test_terms_match_oracle(case, dtype, backend, poison_empty):
    B, T, seq_adv, o, with_old, with_ref = TERM_CASES[case]
    logp, old, ref, adv, mask = make_inputs(B, T, dtype, seed=B * 1000 + T, seq_adv=seq_adv,
                                            clamp_edges=o["clamp"] is not None)
    old, ref = (old if with_old else None), (ref if with_ref else None)
    want = oracle_terms(logp, old, ref, adv, mask, **o)
    opts = TokenLossOptions(ratio_low=o["lo"], ratio_high=o["hi"], dual_clip=o["dual"], log_ratio_clamp=o["clamp"],
                            kl_estimator=o["est"], kl_coef=o["coef"], backend=backend)
    lp, old_d, ref_d, adv_d = dev(logp, old, ref, adv, dtype=dtype)
    lp.requires_grad_()
    terms = pg_token_terms(lp, old_d, ref_d, adv_d, mask.to(DEVICE), opts)
    rtol = rtol_for(dtype)  # element-wise: the clamp-edge tokens are ~e^20, the rest O(1)
    for name in ("loss", "ratio", "approx_kl") + (("kl",) if with_ref else ()):
        got = getattr(terms, name)
        assert got.dtype == dtype and got.shape == (B, T), name
        assert_close(got, want[name], rtol=rtol, atol=rtol, name=f"{case} {name}")
    assert terms.kl is None or with_ref
    assert torch.equal(terms.flags.cpu().long(), want["flags"]), f"flags {terms.flags.cpu()} != {want['flags']}"
    # A non-uniform upstream gradient: the backward must multiply ∂l/∂logp token by token.
    upstream = torch.linspace(0.5, 1.5, B * T, dtype=dtype).view(B, T)
    (grad,) = torch.autograd.grad((terms.loss * upstream.to(DEVICE)).sum(), lp)
    assert_close(grad, want["grad"] * upstream.double(), rtol=rtol, atol=rtol, name=f"{case} d loss / d logp")


# ---------------------------------------------------------------------------------------------
# ppo_policy_loss and grpo_loss end to end
# ---------------------------------------------------------------------------------------------
def check_loss(loss, metrics, lp, want_terms, mask, mode, expected_metrics, dtype, max_len=None):
    w = weights(mask, mode, max_len)
    rtol = rtol_for(dtype)
    assert_close(loss, (want_terms["loss"] * w).sum(), rtol=rtol, name="loss")
    (grad,) = torch.autograd.grad(loss, lp)
    assert_close(grad, want_terms["grad"] * w, rtol=rtol, name="d loss / d logp")
    for key, value in expected_metrics.items():
        assert_close(metrics[key], torch.tensor(value, dtype=FP64), rtol=rtol, atol=rtol, name=key)
    assert set(metrics) == set(expected_metrics)


def token_mean(x, mask):
    return float((x * mask).sum() / mask.sum().clamp(min=1))


PPO_CASES = {  # name: (clip_eps, clip_eps_high, dual_clip, loss_agg, seq_adv, kl_estimator | None, kl_coef)
    "eps0.2-token-mean": (0.2, None, None, "token-mean", False, None, 0.0),
    "eps0.2-high0.28-seq-sum-seqadv": (0.2, 0.28, None, "seq-mean-token-sum", True, None, 0.0),
    "eps0.1-dual3-seq-mean": (0.1, None, 3.0, "seq-mean-token-mean", False, None, 0.0),
    "eps0.2-high0.3-dual1.5-seqadv": (0.2, 0.3, 1.5, "token-mean", True, None, 0.0),
    "eps0-ties-dual2-k1-seq-sum": (0.0, None, 2.0, "seq-mean-token-sum", False, "k1", 0.1),
    "k2-coef0.05-seq-mean": (0.2, None, None, "seq-mean-token-mean", False, "k2", 0.05),
    "k3-coef0-token-mean": (0.2, 0.28, None, "token-mean", True, "k3", 0.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(PPO_CASES))
def test_ppo_policy_loss(case, backend):
    eps, eps_high, dual, agg, seq_adv, est, coef = PPO_CASES[case]
    dtype = FP32 if case.startswith("k3") else FP64
    logp, old, ref, adv, mask = make_inputs(4, 9, dtype, seed=len(case), seq_adv=seq_adv)
    ref = ref if est else None
    want = oracle_terms(logp, old, ref, adv, mask, lo=1 - eps, hi=1 + (eps if eps_high is None else eps_high),
                        dual=dual, clamp=20.0, est=est, coef=coef)
    lp, old_d, ref_d, adv_d = dev(logp, old, ref, adv, dtype=dtype)
    lp.requires_grad_()
    loss, metrics = ppo_policy_loss(lp, old_d, adv_d, mask.to(DEVICE), clip_eps=eps, clip_eps_high=eps_high,
                                    dual_clip=dual, loss_agg=agg, ref_logprobs=ref_d, kl_coef=coef,
                                    kl_estimator=est or "k1", backend=backend)
    m = mask.to(FP64)
    flags = want["flags"]
    expected = {"clipfrac": token_mean((flags & CLIPPED) != 0, m), "approx_kl": token_mean(want["approx_kl"], m),
                "ratio_mean": token_mean(want["ratio"], m)}
    if dual is not None:
        expected["dual_clipfrac"] = token_mean((flags & DUAL_CLIPPED) != 0, m)
        assert expected["dual_clipfrac"] > 0
    if ref is not None:
        expected["kl"] = token_mean(want["kl"], m)
        expected["policy_loss"] = float(((want["loss"] - coef * want["kl"]) * weights(mask, agg)).sum())
    check_loss(loss, metrics, lp, want, mask, agg, expected, dtype)
    assert 0 < expected["clipfrac"] < 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("on_policy", [False, True], ids=["old", "on-policy"])
@pytest.mark.parametrize("beta", [0.0, 0.04], ids=["beta0", "beta0.04"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
def test_grpo_loss(loss_type, beta, on_policy, backend):
    eps, eps_high = 0.2, (0.28 if loss_type in ("grpo", "dr_grpo") else None)
    max_len = 12 if loss_type == "dr_grpo" else None
    logp, old, ref, adv, mask = make_inputs(5, 8, FP64, seed=7, seq_adv=True)
    old = None if on_policy else old
    with_ref = beta > 0 or loss_type == "bnpo"  # bnpo: the kl metric without the penalty
    ref = ref if with_ref else None
    want = oracle_terms(logp, old, ref, adv, mask, lo=1 - eps, hi=1 + (eps_high or eps), dual=None, clamp=None,
                        est="k3", coef=beta)
    lp, old_d, ref_d, adv_d = dev(logp, old, ref, adv, dtype=FP64)
    lp.requires_grad_()
    loss, metrics = grpo_loss(lp, old_d, ref_d, adv_d, mask.to(DEVICE), beta=beta, epsilon=eps,
                              epsilon_high=eps_high, loss_type=loss_type, max_completion_length=max_len,
                              use_bias_correction_kl=False, backend=backend)  # the plain k3 rides in the token pass
    m, flags = mask.to(FP64), want["flags"]
    expected = {"clip_ratio/low_mean": token_mean((flags & CLIP_LOW) != 0, m),
                "clip_ratio/high_mean": token_mean((flags & CLIP_HIGH) != 0, m),
                "clip_ratio/region_mean": token_mean((flags & (CLIP_LOW | CLIP_HIGH)) != 0, m)}
    if with_ref:
        expected["kl"] = token_mean(want["kl"], m)
    check_loss(loss, metrics, lp, want, mask, loss_type, expected, FP64, max_len)
    if not on_policy:
        assert 0 < expected["clip_ratio/region_mean"] < 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "luspo"])
def test_grpo_variants_on_every_backend_match_torch(loss_type, level, backend):
    """GSPO's sequence-level ratio, two-sided clipping and the ρ-weighted KL run the token pass on log ρ:
    every backend gives the torch backend's loss, ∂/∂logp and metrics (which test_grpo checks against TRL)."""
    logp, old, ref, adv, mask = make_inputs(5, 8, FP64, seed=11, seq_adv=True)
    out = {}
    for be in ("torch", backend):
        lp, old_d, ref_d, adv_d = dev(logp, old, ref, adv, dtype=FP64)
        lp.requires_grad_()
        loss, metrics = grpo_loss(lp, old_d, ref_d, adv_d, mask.to(DEVICE), beta=0.04, epsilon_high=0.28, delta=1.5,
                                  loss_type=loss_type, importance_sampling_level=level, backend=be)
        out[be] = (loss, torch.autograd.grad(loss, lp)[0], metrics)
    (l0, g0, m0), (l1, g1, m1) = out["torch"], out[backend]
    assert_close(l1, l0, rtol=1e-12, name="loss")
    assert_close(g1, g0, rtol=1e-12, atol=1e-15, name="d loss / d logp")
    assert m0.keys() == m1.keys() and all(m1[k].item() == pytest.approx(m0[k].item(), rel=1e-12) for k in m0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_gives_zero_without_nan(backend):
    logp, old, ref, adv, _ = make_inputs(3, 5, FP64, seed=1, masked_row=False, spike=False)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    logp[:, 1], old[:, 2] = float("nan"), float("-inf")
    lp, old_d, ref_d, adv_d = dev(logp, old, ref, adv, dtype=FP64)
    lp.requires_grad_()
    for loss, metrics in (
            ppo_policy_loss(lp, old_d, adv_d, mask.to(DEVICE), dual_clip=3.0, ref_logprobs=ref_d, kl_coef=0.1,
                            loss_agg="seq-mean-token-mean", backend=backend),
            grpo_loss(lp, None, ref_d, adv_d, mask.to(DEVICE), beta=0.1, loss_type="grpo", backend=backend)):
        (grad,) = torch.autograd.grad(loss, lp)
        assert loss.item() == 0 and (grad == 0).all()
        assert all(v.item() == 0 for v in metrics.values())


# ---------------------------------------------------------------------------------------------
# dispatch, the native op's checks, torch.library registration
# ---------------------------------------------------------------------------------------------
def test_auto_backend():
    cpu = resolve_backend("auto", torch.device("cpu"))
    assert cpu == ("cpp" if _has_native(torch.device("cpu")) else "torch")
    if torch.cuda.is_available():
        assert resolve_backend("auto", torch.device("cuda")) in ("triton", "cuda")
    with pytest.raises(ValueError, match="backend='gpu'.*'auto', 'torch', 'triton', 'cpp', 'cuda'"):
        resolve_backend("gpu", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="backend='cuda' is not available for cpu tensors"):
        resolve_backend("cuda", torch.device("cpu"))
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        ppo_policy_loss(x, x, x, x > 0, backend="cuda")


def test_ppo_kl_validation():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="ref_logprobs is required when kl_coef > 0"):
        ppo_policy_loss(x, x, x, x > 0, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_estimator='k4'"):
        ppo_policy_loss(x, x, x, x > 0, ref_logprobs=x, kl_estimator="k4")
    with pytest.raises(ValueError, match=r"ref_logprobs \(2, 4\).*logprobs \(2, 3\)"):
        ppo_policy_loss(x, x, x, x > 0, ref_logprobs=torch.randn(2, 4))


native = pytest.mark.skipif(NATIVE not in BACKENDS, reason=f"alignfast._C's pg_token_loss is not built for {DEVICE}")


@native
@pytest.mark.parametrize("bad, message", [
    (lambda lp, a, v: (lp[0], a, v), "logp must be 2-D"),
    (lambda lp, a, v: (lp.long(), a, v), "logp must be float32 or float64"),
    (lambda lp, a, v: (lp, a[:2], v), r"advantages must be \[B, T\]"),
    (lambda lp, a, v: (lp, a.float(), v), "advantages must have logp's dtype"),
    (lambda lp, a, v: (lp, a, v.float()), "valid must be bool"),
    (lambda lp, a, v: (lp, a, v[:, :2]), "valid must have logp's shape"),
], ids=["1d", "int", "adv-shape", "adv-dtype", "valid-dtype", "valid-shape"])
def test_native_bad_input(bad, message):
    lp = torch.randn(3, 4, dtype=FP64, device=DEVICE)
    a, v = torch.randn(3, 4, dtype=FP64, device=DEVICE), torch.ones(3, 4, dtype=torch.bool, device=DEVICE)
    bad_lp, bad_a, bad_v = bad(lp, a, v)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.alignfast.pg_token_loss(bad_lp, None, None, bad_a, bad_v, 0.8, 1.2, None, None, None, 0.0)
    with pytest.raises(RuntimeError, match="kl_estimator must be 'k1', 'k2' or 'k3'"):
        torch.ops.alignfast.pg_token_loss(lp, None, lp, a, v, 0.8, 1.2, None, None, "k9", 0.0)
    with pytest.raises(RuntimeError, match="old_logp must have logp's shape"):
        torch.ops.alignfast.pg_token_loss(lp, lp[:, :2], None, a, v, 0.8, 1.2, None, None, None, 0.0)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_ops_have_fakes(backend):
    """The ops' fake implementations agree with the real ones (what torch.compile traces with)."""
    op = torch.ops.alignfast.pg_token_loss_triton if backend == "triton" else torch.ops.alignfast.pg_token_loss
    g = torch.Generator().manual_seed(0)
    lp, old, ref = (torch.randn(3, 5, generator=g, dtype=FP64).to(DEVICE) for _ in range(3))
    adv, valid = torch.randn(3, generator=g, dtype=FP64).to(DEVICE), torch.ones(3, 5, dtype=torch.bool, device=DEVICE)
    for args in ((lp, old, ref, adv, valid, 0.8, 1.2, 3.0, 20.0, "k3", 0.1),
                 (lp, None, None, adv, valid, 0.8, 1.2, None, None, None, 0.0)):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@native
def test_torch_compile_fullgraph_forward_and_backward():
    """The autograd Function around the native op traces whole (fake impl + first-order backward)."""
    torch._dynamo.reset()
    opts = TokenLossOptions(ratio_low=0.8, ratio_high=1.2, dual_clip=3.0, log_ratio_clamp=20.0, kl_estimator="k3",
                            kl_coef=0.1, backend=NATIVE)

    def f(lp, old, ref, adv, mask):
        terms = pg_token_terms(lp, old, ref, adv, mask, opts)
        return (terms.loss * mask).sum() / mask.sum(), terms.ratio.mean()

    g = torch.Generator().manual_seed(0)
    lp = torch.randn(3, 8, generator=g).to(DEVICE).requires_grad_()
    old, ref = (torch.randn(3, 8, generator=g).to(DEVICE) for _ in range(2))
    adv, mask = torch.randn(3, generator=g).to(DEVICE), (torch.rand(3, 8, generator=g) > 0.2).to(DEVICE)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, want = compiled(lp, old, ref, adv, mask), f(lp, old, ref, adv, mask)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got[0], lp)[0], torch.autograd.grad(want[0], lp)[0])
