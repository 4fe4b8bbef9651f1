"""grpo_loss against a loop-style float64 re-derivation and against TRL's GRPOTrainer._compute_loss."""
import pytest
import torch
from helpers import assert_close
from trl_standins import import_trl, trainer

from alignfast.losses import grpo_loss

B, T = 5, 8
LOSS_TYPES = ["dapo", "grpo", "bnpo", "dr_grpo"]


def make_inputs(seed, *, masked_row=True):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    logp = (old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    old[1, :2] = logp.detach()[1, :2]  # ties: ratio exactly 1
    ref = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.75
    mask[:, 0] = True
    if masked_row:
        mask[3] = False
    return logp, old, ref, adv, mask


def reference(logp, old, ref, adv, mask, beta, eps_low, eps_high, loss_type, max_len):
    rows, total, tokens, low, high, kl_sum = [], 0, 0, 0, 0, 0.0
    for b in range(B):
        row, count = 0, 0
        for t in range(T):
            if not mask[b, t]:
                continue
            r = torch.exp(logp[b, t] - old[b, t])
            loss = -min(r * adv[b], min(max(r, 1 - eps_low), 1 + eps_high) * adv[b])
            d = ref[b, t] - logp[b, t]
            kl = torch.exp(d) - d - 1
            loss = loss + beta * kl
            row, count = row + loss, count + 1
            low += int(r < 1 - eps_low and adv[b] < 0)
            high += int(r > 1 + eps_high and adv[b] > 0)
            kl_sum += float(kl.detach())
        rows.append(row / max(count, 1))
        total, tokens = total + row, tokens + count
    if loss_type == "grpo":
        loss = sum(rows) / B
    elif loss_type == "dr_grpo":
        loss = total / (B * max_len)
    else:
        loss = total / max(tokens, 1)
    n = max(tokens, 1)
    return loss, {"clip_ratio/low_mean": low / n, "clip_ratio/high_mean": high / n,
                  "clip_ratio/region_mean": (low + high) / n, "kl": kl_sum / n}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04], ids=["beta0", "beta0.04"])
@pytest.mark.parametrize("eps_high", [None, 0.28], ids=["sym", "high0.28"])
def test_matches_float64_reference(loss_type, beta, eps_high):
    logp, old, ref, adv, mask = make_inputs(3)
    loss, metrics = grpo_loss(logp, old, ref, adv, mask, beta=beta, epsilon=0.2, epsilon_high=eps_high,
                              loss_type=loss_type, max_completion_length=12)
    exp_loss, exp_metrics = reference(logp, old, ref, adv, mask, beta, 0.2, 0.2 if eps_high is None else eps_high,
                                      loss_type, 12)
    assert_close(loss, exp_loss, rtol=1e-10, name="loss")
    assert_close(torch.autograd.grad(loss, logp)[0], torch.autograd.grad(exp_loss, logp)[0], rtol=1e-10,
                 name="d loss / d logprobs")
    for key, value in exp_metrics.items():
        assert metrics[key].item() == pytest.approx(value, rel=1e-10, abs=1e-12), key
    assert exp_metrics["clip_ratio/region_mean"] > 0


def test_ref_may_be_none_when_beta_zero_and_old_none_means_on_policy():
    logp, _, ref, adv, mask = make_inputs(4)
    loss, metrics = grpo_loss(logp, None, None, adv, mask, loss_type="bnpo")
    assert "kl" not in metrics and metrics["clip_ratio/region_mean"].item() == 0
    exp_loss, _ = reference(logp, logp.detach(), ref, adv, mask, 0.0, 0.2, 0.2, "bnpo", T)
    assert_close(loss, exp_loss, rtol=1e-10, name="loss")
    assert_close(torch.autograd.grad(loss, logp)[0], torch.autograd.grad(exp_loss, logp)[0], rtol=1e-10,
                 name="grad")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_all_masked_gives_zero_without_nan(loss_type):
    logp, old, ref, adv, _ = make_inputs(5)
    loss, metrics = grpo_loss(logp, old, ref, adv, torch.zeros(B, T), beta=0.1, loss_type=loss_type)
    assert loss.item() == 0 and (torch.autograd.grad(loss, logp)[0] == 0).all()
    assert all(v.item() == 0 for v in metrics.values())


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04], ids=["beta0", "beta0.04"])
def test_matches_trl(loss_type, beta):
    GRPOTrainer = import_trl("trl", "GRPOTrainer")
    logp, old, ref, adv, mask = make_inputs(6)
    max_len = 10
    me = trainer(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=type("Args", (), {"use_bias_correction_kl": False, "delta": None})(), loss_type=loss_type,
        epsilon_low=0.2, epsilon_high=0.28, use_vllm=False, _entropy_bonus_enabled=False,
        max_completion_length=max_len, current_gradient_accumulation_steps=1,
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.ones_like(logp), None))
    inputs = {"prompt_ids": torch.ones(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.ones(B, T, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    trl_loss = GRPOTrainer._compute_loss(me, None, inputs)
    loss, metrics = grpo_loss(logp, old, ref, adv, mask, beta=beta, epsilon=0.2, epsilon_high=0.28,
                              loss_type=loss_type, max_completion_length=max_len)
    assert_close(loss, trl_loss, rtol=1e-10, name="loss vs TRL")
    assert_close(torch.autograd.grad(loss, logp)[0], torch.autograd.grad(trl_loss, logp)[0], rtol=1e-10,
                 name="grad vs TRL")
    # TRL reduces its logged metrics through a float32 token count, so they carry float32 rounding.
    logged = me._metrics["eval"]
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean") + (("kl",) if beta else ()):
        assert metrics[key].item() == pytest.approx(logged[key][0], rel=1e-6, abs=1e-12), key


def test_validation():
    logp, old, ref, adv, mask = make_inputs(0)
    with pytest.raises(ValueError, match="ref_logprobs is required"):
        grpo_loss(logp, old, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="loss_type='ppo'.*dapo"):
        grpo_loss(logp, old, ref, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match=r"advantages must be \[B\]=\(5,\)"):
        grpo_loss(logp, old, ref, adv[:4], mask)
    with pytest.raises(ValueError, match=r"ref_logprobs \(5, 7\).*logprobs \(5, 8\)"):
        grpo_loss(logp, old, ref[:, :7], adv, mask)
    with pytest.raises(ValueError, match="beta"):
        grpo_loss(logp, old, ref, adv, mask, beta=-1.0)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logp, old, ref, adv, mask, loss_type="dr_grpo", max_completion_length=0)
