"""kto_loss / kto_kl_estimate against example-by-example float64 re-derivations and TRL's KTOTrainer._compute_loss."""
import pytest
import torch
from helpers import assert_close
from trl_standins import fake_lm, import_trl, trainer

from alignfast.losses import kto_kl_estimate, kto_loss

B = 7
LABELS = {
    "mixed": [True, False, True, True, False, False, True],
    "no-rejected": [True] * B,
    "no-chosen": [False] * B,
}


def reference(policy, ref, labels, kl, beta, wd, wu, loss_type):
    out = []
    for p, r, desirable in zip(policy, ref, labels):
        u = p - r
        if loss_type == "kto":
            loss = 1 - torch.sigmoid(beta * (u - kl)) if desirable else 1 - torch.sigmoid(beta * (kl - u))
        else:
            loss = 1 - torch.sigmoid(beta * u) if desirable else torch.sigmoid(beta * u)
        out.append((wd if desirable else wu) * loss)
    return torch.stack(out)


def make_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    ref = -20 - 10 * torch.rand(B, generator=g, dtype=torch.float64)
    policy = (ref + 3 * torch.randn(B, generator=g, dtype=torch.float64)).requires_grad_()
    with torch.no_grad():
        policy[1] = ref[1]  # a tie: log-ratio exactly 0
    kl_policy = -20 - 10 * torch.rand(B, generator=g, dtype=torch.float64)
    kl_ref = kl_policy - 0.5 * torch.rand(B, generator=g, dtype=torch.float64)
    return policy, ref, kl_policy, kl_ref


@pytest.mark.parametrize("labels", list(LABELS))
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.7)], ids=["w1-1", "w1.33-0.7"])
def test_matches_float64_reference(labels, loss_type, weights):
    policy, ref, kl_policy, kl_ref = make_inputs(1)
    kl = kto_kl_estimate(kl_policy, kl_ref)
    assert kl.item() == pytest.approx(max(float((kl_policy - kl_ref).mean()), 0.0), rel=1e-12) and kl.item() > 0
    lab = torch.tensor(LABELS[labels])
    losses, chosen, rejected = kto_loss(policy, ref, lab, kl, beta=0.1, desirable_weight=weights[0],
                                        undesirable_weight=weights[1], loss_type=loss_type)
    expected = reference(policy, ref, LABELS[labels], kl.item(), 0.1, *weights, loss_type)
    assert_close(losses, expected, rtol=1e-10, name="losses")
    w = torch.randn(B, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert_close(torch.autograd.grad((losses * w).sum(), policy)[0],
                 torch.autograd.grad((expected * w).sum(), policy)[0], rtol=1e-10, name="grad")
    rewards = 0.1 * (policy - ref).detach()
    assert_close(chosen, rewards[lab], rtol=1e-10, name="chosen_rewards")
    assert_close(rejected, rewards[~lab], rtol=1e-10, name="rejected_rewards")
    assert not torch.isnan(losses.mean())


def test_kl_estimate_clamps_and_gathers():
    a = torch.tensor([-3.0, -4.0], dtype=torch.float64, requires_grad=True)
    assert kto_kl_estimate(a, a.detach() + 1).item() == 0  # negative mean clamps to 0
    got = kto_kl_estimate(a, a.detach() - 1, gather=lambda t: torch.stack([t, t - 3]))  # mean(1, -2) < 0
    assert got.item() == 0 and not got.requires_grad
    got = kto_kl_estimate(a, a.detach() - 1, gather=lambda t: torch.stack([t, t + 2]))  # mean(1, 3) = 2
    assert got.item() == pytest.approx(2.0)
    assert kto_kl_estimate(a[:0], a[:0].detach()).item() == 0  # empty: 0, not NaN


@pytest.mark.parametrize("labels", list(LABELS))
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_matches_trl(labels, loss_type):
    KTOTrainer = import_trl("trl", "KTOTrainer")
    g = torch.Generator().manual_seed(3)
    T = 6
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[:, 0] = True
    per_token = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 4 * mask).requires_grad_()
    ref = -10 - 5 * torch.rand(B, generator=g, dtype=torch.float64)
    kl_policy = -20 - 10 * torch.rand(B, generator=g, dtype=torch.float64)
    kl_ref = kl_policy - 0.5 * torch.rand(B, generator=g, dtype=torch.float64)
    lab = torch.tensor(LABELS[labels])
    completion_mask = torch.cat([torch.zeros(B, 1, dtype=torch.long), mask.long()], dim=1)
    inputs = {"input_ids": torch.ones(B, T + 1, dtype=torch.long), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "label": lab, "ref_logps": ref, "ref_KL_logps": kl_ref}
    me = trainer(calculate_KL=loss_type == "kto", precompute_ref_logps=True, loss_type=loss_type, beta=0.1,
                 desirable_weight=1.33, undesirable_weight=0.7, _compute_kl_logps=lambda model, batch: kl_policy)
    trl_loss = KTOTrainer._compute_loss(me, fake_lm(per_token), inputs, False)
    kl = kto_kl_estimate(kl_policy, kl_ref) if loss_type == "kto" else None
    losses, chosen, rejected = kto_loss(per_token.sum(1), ref, lab, kl, beta=0.1, desirable_weight=1.33,
                                        undesirable_weight=0.7, loss_type=loss_type)
    loss = losses.mean()
    assert_close(loss, trl_loss, rtol=1e-10, name="loss vs TRL")
    assert_close(torch.autograd.grad(loss, per_token)[0], torch.autograd.grad(trl_loss, per_token)[0], rtol=1e-10,
                 name="grad vs TRL")
    logged = me._metrics["eval"]
    if chosen.numel():
        assert chosen.mean().item() == pytest.approx(logged["rewards/chosen"][0], rel=1e-10)
    if rejected.numel():
        assert rejected.mean().item() == pytest.approx(logged["rewards/rejected"][0], rel=1e-10)
    if loss_type == "kto":
        assert kl.item() == pytest.approx(logged["kl"][0], rel=1e-10)


def test_validation():
    policy, ref, _, _ = make_inputs(0)
    lab = torch.tensor(LABELS["mixed"])
    with pytest.raises(ValueError, match="beta"):
        kto_loss(policy, ref, lab, 0.1, beta=0)
    with pytest.raises(ValueError, match="kl is required"):
        kto_loss(policy, ref, lab, None)
    with pytest.raises(ValueError, match=r"labels \(6,\) does not match policy_logps \(7,\)"):
        kto_loss(policy, ref, lab[:6], 0.1)
    with pytest.raises(ValueError, match=r"ref_logps \(6,\).*policy_logps \(7,\)"):
        kto_loss(policy, ref[:6], lab, 0.1)
    with pytest.raises(ValueError, match="labels must be bool"):
        kto_loss(policy, ref, lab.double(), 0.1)
    with pytest.raises(ValueError, match="loss_type='bco'.*'kto'"):
        kto_loss(policy, ref, lab, 0.1, loss_type="bco")
    with pytest.raises(ValueError, match="desirable_weight"):
        kto_loss(policy, ref, lab, 0.1, desirable_weight=-1.0)
