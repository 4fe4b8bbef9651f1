"""dpo_loss, every loss type and f-divergence, against pair-by-pair float64 re-derivations of the papers'
formulas and against TRL 1.16's DPOTrainer._compute_loss run on a stand-in trainer."""
import math

import pytest
import torch
from helpers import assert_close
from trl_standins import fake_lm, import_trl, trainer

from alignfast.losses import DPO_LOSSES, dpo_loss
from alignfast.losses.dpo import F_DIVERGENCE_LOSS_TYPES

B = 6
LOSS_TYPES = sorted(DPO_LOSSES)
F_DIVERGENCES = ["forward_kl", "js_divergence", "alpha_divergence"]
SMOOTHING = {"sigmoid": 0.1, "robust": 0.1, "exo_pair": 1e-3, "aot": 0.1, "aot_unpaired": 0.1}


def logsig(x):
    return -torch.log1p(torch.exp(-x)) if x >= 0 else x - torch.log1p(torch.exp(x))


def sig(x):
    return torch.exp(logsig(x))


def score(u, f, alpha):
    if f == "reverse_kl":
        return u
    if f == "forward_kl":
        return 1 - torch.exp(-u)
    if f == "js_divergence":
        return math.log(2) + logsig(u)
    return (torch.exp((alpha - 1) * u) - 1) / (alpha - 1)


def reference(pc, pr, rc, rr, *, beta, loss_type, eps, f, alpha, lc, lr, tau, bco_shift):
    """The per-pair losses [B], one pair at a time."""
    uc, ur = [pc[i] - rc[i] for i in range(B)], [pr[i] - rr[i] for i in range(B)]
    sc, sr = [score(u, f, alpha) for u in uc], [score(u, f, alpha) for u in ur]
    if loss_type in ("aot", "aot_unpaired"):  # sort over the batch (stable, as in dpo.py)
        if loss_type == "aot":
            a = sorted([pc[i] - pr[i] for i in range(B)], key=lambda x: float(x.detach()))
            b = sorted([rc[i] - rr[i] for i in range(B)], key=lambda x: float(x.detach()))
        else:
            a, b = sorted(uc, key=lambda x: float(x.detach())), sorted(ur, key=lambda x: float(x.detach()))
        return torch.stack([-(1 - eps) * logsig(beta * (a[i] - b[i])) - eps * logsig(-beta * (a[i] - b[i]))
                            for i in range(B)])
    if loss_type == "bco_pair" and bco_shift is None:
        bco_shift = float(sum(beta * u for u in uc + ur).detach()) / (2 * B)
    out = []
    for i in range(B):
        d = sc[i] - sr[i]
        z = beta * d
        if loss_type == "sigmoid":
            out.append(-(1 - eps) * logsig(z) - eps * logsig(-z))
        elif loss_type == "hinge":
            out.append(torch.clamp(1 - z, min=0))
        elif loss_type == "ipo":
            out.append((sc[i] / max(lc[i], 1) - sr[i] / max(lr[i], 1) - 1 / (2 * beta)) ** 2)
        elif loss_type == "sigmoid_norm":
            out.append(-logsig(beta * (sc[i] / max(lc[i], 1) - sr[i] / max(lr[i], 1))))
        elif loss_type == "exo_pair":
            out.append(sig(z) * (logsig(z) - math.log(1 - eps)) + sig(-z) * (logsig(-z) - math.log(eps)))
        elif loss_type == "nca_pair":
            out.append(-logsig(beta * uc[i]) - 0.5 * logsig(-beta * uc[i]) - 0.5 * logsig(-beta * ur[i]))
        elif loss_type == "robust":
            out.append((-(1 - eps) * logsig(z) + eps * logsig(-z)) / (1 - 2 * eps))
        elif loss_type == "bco_pair":
            out.append(-logsig(beta * uc[i] - bco_shift) - logsig(-(beta * ur[i] - bco_shift)))
        elif loss_type == "sppo_hard":
            out.append((uc[i] - 0.5 / beta) ** 2 + (ur[i] + 0.5 / beta) ** 2)
        elif loss_type == "apo_zero":
            out.append(1 - sig(beta * uc[i]) + sig(beta * ur[i]))
        elif loss_type == "apo_down":
            out.append(sig(beta * uc[i]) + 1 - sig(beta * (uc[i] - ur[i])))
        elif loss_type == "discopop":
            w = sig(z / tau)
            out.append((1 - w) * -logsig(z) + w * torch.exp(-z))
        else:
            raise AssertionError(loss_type)
    return torch.stack(out)


def make_inputs(seed, dtype=torch.float64, *, tie=True):
    g = torch.Generator().manual_seed(seed)
    ref_c = -20 - 10 * torch.rand(B, generator=g, dtype=torch.float64)
    ref_r = -20 - 10 * torch.rand(B, generator=g, dtype=torch.float64)
    pc = ref_c + 3 * torch.randn(B, generator=g, dtype=torch.float64)
    pr = ref_r + 3 * torch.randn(B, generator=g, dtype=torch.float64)
    if tie:  # a pair with equal chosen/rejected log-ratios, and a repeated log-ratio within the batch
        pc[0], pr[0], ref_c[0], ref_r[0] = -22.0, -25.0, -21.0, -24.0
        pc[1], ref_c[1] = pc[2] - ref_c[2] - 21.5, -21.5
    lengths_c = torch.randint(1, 40, (B,), generator=g)
    lengths_r = torch.randint(1, 40, (B,), generator=g)
    return [t.to(dtype).requires_grad_() for t in (pc, pr, ref_c, ref_r)], lengths_c, lengths_r


def check(loss_type, f, alpha, *, beta=0.1, tau=0.05, bco=None, seed=0):
    (pc, pr, rc, rr), lc, lr = make_inputs(seed)
    eps = SMOOTHING.get(loss_type, 0.0)
    kw = dict(beta=beta, loss_type=loss_type, label_smoothing=eps, f_divergence=f, f_alpha_divergence_coef=alpha,
              chosen_lengths=lc, rejected_lengths=lr, discopop_tau=tau, bco_running_mean=bco)
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, **kw)
    expected = reference(pc, pr, rc, rr, beta=beta, loss_type=loss_type, eps=eps, f=f, alpha=alpha,
                         lc=lc.tolist(), lr=lr.tolist(), tau=tau, bco_shift=bco)
    assert_close(losses, expected, rtol=1e-10, name=f"{loss_type} losses")
    w = torch.randn(B, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    got = torch.autograd.grad((losses * w).sum(), (pc, pr))
    want = torch.autograd.grad((expected * w).sum(), (pc, pr))
    for a, b, name in zip(got, want, ("policy_chosen", "policy_rejected")):
        assert_close(a, b, rtol=1e-10, name=f"{loss_type} d/d {name}")
    assert_close(cr, beta * (pc - rc), rtol=1e-10, name="chosen_rewards")
    assert_close(rj, beta * (pr - rr), rtol=1e-10, name="rejected_rewards")
    assert not cr.requires_grad and not rj.requires_grad


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_float64_reference(loss_type):
    check(loss_type, "reverse_kl", 0.5)


@pytest.mark.parametrize("bco", [None, 0.3], ids=["batch-mean", "running0.3"])
def test_bco_pair_shift(bco):
    check("bco_pair", "reverse_kl", 0.5, bco=bco, seed=1)


@pytest.mark.parametrize("f", F_DIVERGENCES)
@pytest.mark.parametrize("loss_type", sorted(F_DIVERGENCE_LOSS_TYPES))
def test_f_divergences_match_float64_reference(loss_type, f):
    check(loss_type, f, 0.5 if f == "alpha_divergence" else 1.0, seed=2)


def test_alpha_divergence_at_one_is_reverse_kl():
    (pc, pr, rc, rr), _, _ = make_inputs(3)
    a = dpo_loss(pc, pr, rc, rr, f_divergence="alpha_divergence", f_alpha_divergence_coef=1.0)[0]
    assert_close(a, dpo_loss(pc, pr, rc, rr)[0], rtol=1e-12, name="alpha=1")


def test_float32_in_float32_out():
    (pc, pr, rc, rr), _, _ = make_inputs(4, torch.bfloat16)
    losses, cr, rj = dpo_loss(pc, pr, rc, rr)
    assert losses.dtype == cr.dtype == rj.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# parity with TRL 1.16 DPOTrainer._compute_loss (precomputed reference log-probs, stand-in model)
# ---------------------------------------------------------------------------------------------
def trl_dpo(loss_type, f, alpha, eps, dtype, seed, tau=0.05):
    """TRL's mean loss, its logged reward metrics, and what alignfast gets from the same per-token log-probs."""
    DPOTrainer = import_trl("trl", "DPOTrainer")
    g = torch.Generator().manual_seed(seed)
    T = 7
    mask = torch.rand(2 * B, T, generator=g) < 0.8
    mask[:, 0] = True
    per_token = (-torch.rand(2 * B, T, generator=g, dtype=torch.float64) * 4 * mask).to(dtype).requires_grad_()
    ref = (-20 - 10 * torch.rand(2 * B, generator=g, dtype=torch.float64)).to(dtype)
    completion_mask = torch.cat([torch.zeros(2 * B, 1, dtype=torch.long), mask.long()], dim=1)
    inputs = {"input_ids": torch.ones(2 * B, T + 1, dtype=torch.long), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    me = trainer(ld_alpha=None, precompute_ref_logps=True, f_divergence_type=f, f_alpha_divergence_coef=alpha,
                 loss_types=[loss_type], loss_weights=[1.0], beta=0.1, label_smoothing=eps, use_weighting=False,
                 args=type("Args", (), {"discopop_tau": tau})())
    trl_loss = DPOTrainer._compute_loss(me, fake_lm(per_token), inputs, False)
    logps = per_token.sum(1)
    lengths = mask.sum(1)
    losses, cr, rj = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta=0.1, loss_type=loss_type,
                              label_smoothing=eps, f_divergence=f, f_alpha_divergence_coef=alpha,
                              chosen_lengths=lengths[:B], rejected_lengths=lengths[B:], discopop_tau=tau,
                              bco_running_mean=0.0 if loss_type == "bco_pair" else None)
    return trl_loss, losses.mean(), per_token, me._metrics["eval"], cr, rj


def compare_with_trl(loss_type, f, alpha, dtype, rtol):
    # TRL 1.16's sigmoid ignores label_smoothing (alignfast applies cDPO), so compare it at 0.
    eps = 0.0 if loss_type == "sigmoid" else SMOOTHING.get(loss_type, 0.0)
    trl_loss, loss, per_token, logged, cr, rj = trl_dpo(loss_type, f, alpha, eps, dtype, seed=len(loss_type))
    assert_close(loss, trl_loss, rtol=rtol, name=f"{loss_type}/{f} loss vs TRL")
    assert_close(torch.autograd.grad(loss, per_token)[0], torch.autograd.grad(trl_loss, per_token)[0], rtol=rtol,
                 name=f"{loss_type}/{f} grad vs TRL")
    assert cr.mean().item() == pytest.approx(logged["rewards/chosen"][0], rel=rtol)
    assert rj.mean().item() == pytest.approx(logged["rewards/rejected"][0], rel=rtol)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_trl(loss_type):
    # exo_pair: TRL takes log ε of a float32 tensor, so its value carries float32 rounding.
    compare_with_trl(loss_type, "reverse_kl", 0.5, torch.float64, 1e-6 if loss_type == "exo_pair" else 1e-10)


@pytest.mark.parametrize("f", F_DIVERGENCES)
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust", "discopop", "sigmoid_norm"])
def test_f_divergences_match_trl(loss_type, f):
    # alpha_divergence: TRL's clamp table has no float64 entry, so that case runs in float32 on both sides.
    dtype = torch.float32 if f == "alpha_divergence" else torch.float64
    compare_with_trl(loss_type, f, 0.5, dtype, 1e-5 if dtype == torch.float32 else 1e-10)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def test_validation():
    (pc, pr, rc, rr), lc, lr = make_inputs(0)
    with pytest.raises(ValueError, match="beta must be"):
        dpo_loss(pc, pr, rc, rr, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="loss_type='dpo' is unknown.*'sigmoid'"):
        dpo_loss(pc, pr, rc, rr, loss_type="dpo")
    with pytest.raises(ValueError, match=r"ref_rejected_logps \(5,\).*policy_chosen_logps \(6,\)"):
        dpo_loss(pc, pr, rc, rr[:5])
    for lt in ("ipo", "sigmoid_norm"):
        with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
            dpo_loss(pc, pr, rc, rr, loss_type=lt, chosen_lengths=lc)
    with pytest.raises(ValueError, match=r"chosen_lengths must be \[B\]"):
        dpo_loss(pc, pr, rc, rr, loss_type="ipo", chosen_lengths=lc[:3], rejected_lengths=lr)
    with pytest.raises(ValueError, match="exo_pair' needs label_smoothing > 0"):
        dpo_loss(pc, pr, rc, rr, loss_type="exo_pair")
    with pytest.raises(ValueError, match="f_divergence='forward_kl' is only valid"):
        dpo_loss(pc, pr, rc, rr, loss_type="nca_pair", f_divergence="forward_kl")
    with pytest.raises(ValueError, match="f_divergence='kl'"):
        dpo_loss(pc, pr, rc, rr, f_divergence="kl")
    with pytest.raises(ValueError, match="must be 1-D"):
        dpo_loss(pc[None], pr[None], rc[None], rr[None])
