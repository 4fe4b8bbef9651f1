"""reward_loss against a pair-by-pair float64 re-derivation and TRL's RewardTrainer.compute_loss."""
import pytest
import torch
from helpers import assert_close
from trl_standins import import_trl, trainer

from alignfast.losses import reward_loss

B = 6


def make_scores(seed):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(B, generator=g, dtype=torch.float64)
    r = torch.randn(B, generator=g, dtype=torch.float64)
    r[0] = c[0]  # a tie
    margin = torch.rand(B, generator=g, dtype=torch.float64)
    return c.requires_grad_(), r.requires_grad_(), margin


def reference(c, r, margin, coef):
    total = 0
    for i in range(B):
        m = 0.0 if margin is None else (margin[i] if isinstance(margin, torch.Tensor) else margin)
        total = total + torch.log1p(torch.exp(-(c[i] - r[i] - m)))
    loss = total / B
    if coef is not None:
        loss = loss + coef * sum((c[i] + r[i]) ** 2 for i in range(B)) / B
    return loss


@pytest.mark.parametrize("margin", ["none", "float", "per-pair"])
@pytest.mark.parametrize("coef", [None, 0.01], ids=["no-center", "center0.01"])
def test_matches_float64_reference(margin, coef):
    c, r, m = make_scores(1)
    m = {"none": None, "float": 0.25, "per-pair": m}[margin]
    loss, metrics = reward_loss(c, r, margin=m, center_rewards_coefficient=coef)
    expected = reference(c, r, m, coef)
    assert_close(loss, expected, rtol=1e-10, name="loss")
    for a, b in zip(torch.autograd.grad(loss, (c, r)), torch.autograd.grad(expected, (c, r))):
        assert_close(a, b, rtol=1e-10, name="grad")
    diff = (c - r).detach()
    assert metrics["accuracy"].item() == pytest.approx((diff > 0).double().mean().item())
    assert metrics["margin"].item() == pytest.approx(diff.mean().item(), rel=1e-12)


@pytest.mark.parametrize("margin", [False, True], ids=["no-margin", "margin"])
@pytest.mark.parametrize("coef", [None, 0.01], ids=["no-center", "center0.01"])
def test_matches_trl(margin, coef):
    RewardTrainer = import_trl("trl", "RewardTrainer")
    c, r, m = make_scores(2)
    logits = torch.cat([c, r]).unsqueeze(-1)
    inputs = {"input_ids": torch.ones(2 * B, 3, dtype=torch.long)}
    if margin:
        inputs["margin"] = m
    me = trainer(args=type("Args", (), {"center_rewards_coefficient": coef})())
    trl_loss = RewardTrainer.compute_loss(me, lambda **kw: type("Out", (), {"logits": logits})(), inputs)
    loss, metrics = reward_loss(c, r, margin=m if margin else None, center_rewards_coefficient=coef)
    assert_close(loss, trl_loss, rtol=1e-10, name="loss vs TRL")
    for a, b in zip(torch.autograd.grad(loss, (c, r)), torch.autograd.grad(trl_loss, (c, r))):
        assert_close(a, b, rtol=1e-10, name="grad vs TRL")
    logged = me._metrics["eval"]
    for key in ("margin", "min_reward", "mean_reward", "max_reward"):
        assert metrics[key].item() == pytest.approx(logged[key][0], rel=1e-10), key
    # TRL averages the accuracy as .float(): float32 rounding.
    assert metrics["accuracy"].item() == pytest.approx(logged["accuracy"][0], rel=1e-6)


def test_validation():
    c, r, m = make_scores(0)
    with pytest.raises(ValueError, match=r"rejected_scores \(5,\).*chosen_scores \(6,\)"):
        reward_loss(c, r[:5])
    with pytest.raises(ValueError, match=r"margin must be a float, 0-dim or \[B\]"):
        reward_loss(c, r, margin=m[:2])
    with pytest.raises(ValueError, match="center_rewards_coefficient"):
        reward_loss(c, r, center_rewards_coefficient=float("nan"))
