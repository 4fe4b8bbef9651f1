"""simpo_loss / orpo_loss / cpo_loss against pair-by-pair float64 re-derivations and TRL's CPO/ORPO loss methods."""
import math

import pytest
import torch
from helpers import assert_close
from trl_standins import accelerator, import_trl

from alignfast.losses import cpo_loss, orpo_loss, simpo_loss

B = 6


def logsig(x):
    return -torch.log1p(torch.exp(-x)) if x >= 0 else x - torch.log1p(torch.exp(x))


def make_logps(seed, *, avg, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    scale = 2.0 if avg else 30.0
    c = -scale * torch.rand(B, generator=g, dtype=torch.float64) - 0.01
    r = -scale * torch.rand(B, generator=g, dtype=torch.float64) - 0.01
    r[0] = c[0]  # a tie
    c[1] = -0.6931471805599453  # log1mexp's branch point (avg log-probs only matter for ORPO)
    return c.to(dtype).requires_grad_(), r.to(dtype).requires_grad_()


def grads_match(ours, expected, inputs, name):
    w = torch.randn(B, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(ours.dtype)
    for a, b, n in zip(torch.autograd.grad((ours * w).sum(), inputs, retain_graph=True),
                       torch.autograd.grad((expected * w).sum(), inputs, retain_graph=True),
                       ("chosen", "rejected")):
        assert_close(a, b, rtol=1e-10, name=f"{name} d/d {n}")


# ---------------------------------------------------------------------------------------------
# SimPO
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [0.0, 0.1], ids=["ls0", "ls0.1"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["averaged", "summed+lengths"])
def test_simpo_matches_float64_reference(eps, with_lengths):
    c, r = make_logps(1, avg=not with_lengths)
    g = torch.Generator().manual_seed(2)
    lc, lr = torch.randint(1, 30, (B,), generator=g), torch.randint(1, 30, (B,), generator=g)
    kw = dict(chosen_lengths=lc, rejected_lengths=lr) if with_lengths else {}
    losses, metrics = simpo_loss(c, r, beta=2.0, gamma=0.5, label_smoothing=eps, **kw)
    expected = []
    for i in range(B):
        ac = c[i] / int(lc[i]) if with_lengths else c[i]
        ar = r[i] / int(lr[i]) if with_lengths else r[i]
        z = 2.0 * (ac - ar) - 0.5
        expected.append(-(1 - eps) * logsig(z) - eps * logsig(-z))
    expected = torch.stack(expected)
    assert_close(losses, expected, rtol=1e-10, name="simpo")
    grads_match(losses, expected, (c, r), "simpo")
    avg_c = (c / lc if with_lengths else c).detach()
    assert metrics["rewards/chosen"].item() == pytest.approx((2.0 * avg_c).mean().item(), rel=1e-12)


def test_simpo_matches_trl_cpo_simpo():
    CPOTrainer = import_trl("trl.experimental.cpo", "CPOTrainer")
    c, r = make_logps(3, avg=True)
    me = type("Self", (), dict(alpha=0.0, beta=2.0, loss_type="simpo", simpo_gamma=0.5, label_smoothing=0.1,
                                accelerator=accelerator()))()
    trl_losses, trl_c, trl_r = CPOTrainer.cpo_loss(me, c, r)
    losses, metrics = simpo_loss(c, r, beta=2.0, gamma=0.5, label_smoothing=0.1)
    assert_close(losses, trl_losses, rtol=1e-10, name="simpo vs TRL")
    grads_match(losses, trl_losses, (c, r), "simpo vs TRL")
    assert metrics["rewards/margins"].item() == pytest.approx((trl_c - trl_r).mean().item(), rel=1e-10)


# ---------------------------------------------------------------------------------------------
# ORPO
# ---------------------------------------------------------------------------------------------
def orpo_reference(c, r, nll, beta):
    out = []
    for i in range(B):
        pc, pr = torch.exp(c[i]), torch.exp(r[i])
        log_odds = torch.log(pc / (1 - pc)) - torch.log(pr / (1 - pr))
        out.append((nll[i] if nll.dim() else nll) - beta * logsig(log_odds))
    return torch.stack(out)


@pytest.mark.parametrize("nll_shape", ["scalar", "per-pair"])
def test_orpo_matches_float64_reference(nll_shape):
    c, r = make_logps(4, avg=True)
    g = torch.Generator().manual_seed(5)
    nll = (torch.rand((B,) if nll_shape == "per-pair" else (), generator=g, dtype=torch.float64) + 1).requires_grad_()
    losses, metrics = orpo_loss(c, r, nll, beta=0.1)
    expected = orpo_reference(c, r, nll, 0.1)
    assert_close(losses, expected, rtol=1e-10, name="orpo")
    grads_match(losses, expected, (c, r), "orpo")
    assert_close(torch.autograd.grad(losses.sum(), nll)[0], torch.autograd.grad(expected.sum(), nll)[0], rtol=1e-12,
                 name="d/d nll")
    assert metrics["nll_loss"].item() == pytest.approx(nll.mean().item())


def test_orpo_empty_completions_stay_finite():
    """An empty completion averages to log P = 0 (P = 1, infinite odds): its pair's loss and gradients stay
    finite, the other pairs' are unchanged."""
    c, r = make_logps(7, avg=True)
    nll = torch.tensor(1.3, dtype=torch.float64)
    base, _ = orpo_loss(c, r, nll, beta=0.1)
    c0 = c.detach().clone().index_fill_(0, torch.tensor([0, 1]), 0.0).requires_grad_()
    r0 = r.detach().clone().index_fill_(0, torch.tensor([1]), 0.0).requires_grad_()
    losses, metrics = orpo_loss(c0, r0, nll, beta=0.1)
    assert torch.isfinite(losses).all() and all(torch.isfinite(m).all() for m in metrics.values())
    assert losses[1].item() == pytest.approx(1.3 + 0.1 * math.log(2.0), rel=1e-12)   # both empty: log σ(0)
    assert_close(losses[2:], base[2:], rtol=1e-15, name="the other pairs")
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(losses.sum(), (c0, r0)))


def test_orpo_matches_trl():
    # TRL's odds_ratio_loss casts to float32, so both sides run in float32 here.
    ORPOTrainer = import_trl("trl.experimental.orpo", "ORPOTrainer")
    c, r = make_logps(6, avg=True, dtype=torch.float32)
    nll = torch.tensor(1.7)
    me = type("Self", (), dict(beta=0.1, accelerator=accelerator()))()
    trl_losses, trl_c, trl_r, trl_ratio, trl_log_odds = ORPOTrainer.odds_ratio_loss(me, c, r)
    losses, metrics = orpo_loss(c, r, nll, beta=0.1)
    trl_total = nll - trl_losses.mean()  # TRL: loss = policy_nll_loss - losses.mean()
    assert_close(losses.mean(), trl_total, rtol=1e-6, name="orpo vs TRL")
    for a, b in zip(torch.autograd.grad(losses.mean(), (c, r)), torch.autograd.grad(trl_total, (c, r))):
        assert_close(a, b, rtol=1e-5, name="orpo grad vs TRL")
    assert metrics["log_odds_ratio"].item() == pytest.approx(trl_ratio.item(), rel=1e-6)
    assert metrics["log_odds_chosen"].item() == pytest.approx(trl_log_odds.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# CPO
# ---------------------------------------------------------------------------------------------
def cpo_reference(c, r, nll, beta, eps, loss_type, gamma, cpo_alpha, alpha):
    out = []
    for i in range(B):
        if alpha:
            rc, rr = (1 - torch.exp(c[i]) ** (-alpha)) / alpha, (1 - torch.exp(r[i]) ** (-alpha)) / alpha
        else:
            rc, rr = c[i], r[i]
        z = rc - rr
        if loss_type == "sigmoid":
            loss = -(1 - eps) * logsig(beta * z) - eps * logsig(-beta * z)
        elif loss_type == "simpo":
            loss = -(1 - eps) * logsig(beta * z - gamma) - eps * logsig(-(beta * z - gamma))
        elif loss_type == "hinge":
            loss = torch.clamp(1 - beta * z, min=0)
        else:
            loss = (z - 1 / (2 * beta)) ** 2
        out.append(loss + cpo_alpha * nll)
    return torch.stack(out)


CPO_CASES = {
    "sigmoid": ("sigmoid", 0.0, 0.0), "sigmoid-ls0.1": ("sigmoid", 0.1, 0.0), "hinge": ("hinge", 0.0, 0.0),
    "ipo": ("ipo", 0.0, 0.0), "simpo-ls0.1": ("simpo", 0.1, 0.0), "sigmoid-alphapo0.3": ("sigmoid", 0.0, 0.3),
}


@pytest.mark.parametrize("case", list(CPO_CASES))
def test_cpo_matches_float64_reference_and_trl(case):
    loss_type, eps, alpha = CPO_CASES[case]
    c, r = make_logps(7, avg=loss_type in ("ipo", "simpo"))
    nll = torch.tensor(1.3, dtype=torch.float64)
    beta = 0.3 if loss_type == "hinge" else 0.1  # hinge: some pairs inside and some outside the margin
    losses, metrics = cpo_loss(c, r, nll, beta=beta, label_smoothing=eps, loss_type=loss_type, simpo_gamma=0.5,
                               cpo_alpha=1.0, alpha=alpha)
    expected = cpo_reference(c, r, nll, beta, eps, loss_type, 0.5, 1.0, alpha)
    assert_close(losses, expected, rtol=1e-10, name=f"cpo {case}")
    grads_match(losses, expected, (c, r), f"cpo {case}")

    CPOTrainer = import_trl("trl.experimental.cpo", "CPOTrainer")
    me = type("Self", (), dict(alpha=alpha, beta=beta, loss_type=loss_type, simpo_gamma=0.5, label_smoothing=eps,
                                accelerator=accelerator()))()
    trl_losses, trl_c, trl_r = CPOTrainer.cpo_loss(me, c, r)
    trl_total = trl_losses.mean() + 1.0 * nll  # TRL: loss = losses.mean() + cpo_alpha * policy_nll_loss
    assert_close(losses.mean(), trl_total, rtol=1e-10, name=f"cpo {case} vs TRL")
    for a, b in zip(torch.autograd.grad(losses.mean(), (c, r)), torch.autograd.grad(trl_total, (c, r))):
        assert_close(a, b, rtol=1e-10, name=f"cpo {case} grad vs TRL")
    assert metrics["rewards/chosen"].item() == pytest.approx(trl_c.mean().item(), rel=1e-10)
    assert metrics["rewards/rejected"].item() == pytest.approx(trl_r.mean().item(), rel=1e-10)


def test_validation():
    c, r = make_logps(0, avg=True)
    with pytest.raises(ValueError, match="beta"):
        simpo_loss(c, r, beta=-1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        simpo_loss(c, r, label_smoothing=0.7)
    with pytest.raises(ValueError, match="pass both chosen_lengths and rejected_lengths"):
        simpo_loss(c, r, chosen_lengths=torch.ones(B))
    with pytest.raises(ValueError, match=r"policy_rejected_logps \(5,\).*policy_chosen_logps \(6,\)"):
        simpo_loss(c, r[:5])
    with pytest.raises(ValueError, match=r"chosen_nll must be 0-dim or \[B\]"):
        orpo_loss(c, r, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="chosen_nll is required"):
        cpo_loss(c, r)
    with pytest.raises(ValueError, match="loss_type='kto'.*sigmoid"):
        cpo_loss(c, r, torch.tensor(1.0), loss_type="kto")
    assert not math.isnan(cpo_loss(c, r, cpo_alpha=0.0)[0].sum().item())
