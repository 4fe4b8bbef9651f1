"""grpo_loss against a loop-style float64 re-derivation and against TRL's GRPOTrainer._compute_loss."""
import pytest
import torch
from helpers import assert_close
from trl_standins import import_trl, trainer

from alignfast.losses import grpo_loss

B, T = 5, 8
LOSS_TYPES = ["dapo", "grpo", "bnpo", "dr_grpo", "luspo", "cispo", "sapo"]
CLIPPED = ["dapo", "grpo", "bnpo", "dr_grpo", "luspo"]
TAU_POS, TAU_NEG = 1.0, 1.0625  # exact in float32 too: TRL forms τ as a float32 tensor


def make_inputs(seed, *, masked_row=True):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    # sequences that drifted: rows 0 and 2 far enough, with their advantage's sign, for GSPO's clip to bite
    shift = (torch.rand(B, 1, generator=g, dtype=torch.float64) - 0.5) * 0.8
    shift[0], shift[2] = 0.5, -0.5
    logp = (old + shift + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    old[1, :2] = logp.detach()[1, :2]  # ties: ratio exactly 1
    ref = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    adv[0], adv[2] = adv[0].abs(), -adv[2].abs()
    mask = torch.rand(B, T, generator=g) < 0.75
    mask[:, 0] = True
    if masked_row:
        mask[3] = False
    return logp, old, ref, adv, mask


def reference(logp, old, ref, adv, mask, beta, eps_low, eps_high, loss_type, max_len, *, level="token", delta=None,
              corrected=False):
    """A loop over tokens, each formula written out from its paper / TRL's description."""
    rows, total, tokens, kl_sum = [], 0, 0, 0.0
    flags = {"low": 0, "high": 0, "cispo": 0}
    for b in range(B):
        count = int(mask[b].sum())
        seq_ratio = sum((logp[b, t] - old[b, t] for t in range(T) if mask[b, t]), torch.zeros((), dtype=logp.dtype))
        seq_ratio = torch.exp(seq_ratio / max(count, 1))
        row = 0
        for t in range(T):
            if not mask[b, t]:
                continue
            r = torch.exp(logp[b, t] - old[b, t]) if level == "token" else seq_ratio
            a = adv[b]
            if loss_type in CLIPPED:
                unclipped = torch.minimum(r, torch.tensor(delta, dtype=r.dtype)) if delta is not None else r
                loss = -torch.minimum(unclipped * a, r.clamp(1 - eps_low, 1 + eps_high) * a)
            elif loss_type == "cispo":
                loss = -torch.minimum(r, torch.tensor(eps_high, dtype=r.dtype)).detach() * a * logp[b, t]
            else:  # sapo
                tau = TAU_POS if a > 0 else TAU_NEG
                loss = -torch.sigmoid(tau * (r - 1)) * 4 / tau * a
            d = ref[b, t] - logp[b, t]
            kl = (torch.exp(d) - d - 1) * (r if corrected else 1)
            loss = loss + beta * kl
            row = row + loss
            kl_sum += float(kl.detach())
            if level == "token":
                flags["low"] += int(r < 1 - eps_low and a < 0)
                flags["high"] += int(r > 1 + eps_high and a > 0)
                flags["cispo"] += int(r > eps_high and a > 0)
        if level == "sequence":  # one flag per completion
            flags["low"] += int(seq_ratio < 1 - eps_low and adv[b] < 0)
            flags["high"] += int(seq_ratio > 1 + eps_high and adv[b] > 0)
            flags["cispo"] += int(seq_ratio > eps_high and adv[b] > 0)
        rows.append(row / max(count, 1))
        total, tokens = total + row, tokens + count
    if loss_type in ("grpo", "sapo"):
        loss = sum(rows) / B
    elif loss_type == "dr_grpo":
        loss = total / (B * max_len)
    elif loss_type == "luspo":
        loss = total / B
    else:
        loss = total / max(tokens, 1)
    n = max(tokens, 1) if level == "token" else B
    metrics = {"kl": kl_sum / max(tokens, 1)}
    if loss_type in CLIPPED:
        metrics.update({"clip_ratio/low_mean": flags["low"] / n, "clip_ratio/high_mean": flags["high"] / n,
                        "clip_ratio/region_mean": (flags["low"] + flags["high"]) / n})
    elif loss_type == "cispo":
        metrics["cispo_clip_ratio"] = flags["cispo"] / n
    return loss, metrics


VARIANTS = {  # name: (importance_sampling_level, delta, use_bias_correction_kl)
    "token": ("token", None, False), "token-corrected": ("token", None, True), "token-delta": ("token", 1.6, True),
    "sequence": ("sequence", None, False), "sequence-corrected": ("sequence", None, True),
    "sequence-delta": ("sequence", 1.4, False)}


def variants_for(loss_type):
    return [v for v in VARIANTS if loss_type in CLIPPED or VARIANTS[v][1] is None]


@pytest.mark.parametrize("loss_type,variant", [(lt, v) for lt in LOSS_TYPES for v in variants_for(lt)])
@pytest.mark.parametrize("beta", [0.0, 0.04], ids=["beta0", "beta0.04"])
@pytest.mark.parametrize("eps_high", [None, 0.28], ids=["sym", "high0.28"])
def test_matches_float64_reference(loss_type, variant, beta, eps_high):
    level, delta, corrected = VARIANTS[variant]
    logp, old, ref, adv, mask = make_inputs(3)
    loss, metrics = grpo_loss(logp, old, ref, adv, mask, beta=beta, epsilon=0.2, epsilon_high=eps_high,
                              loss_type=loss_type, max_completion_length=12, importance_sampling_level=level,
                              delta=delta, use_bias_correction_kl=corrected, sapo_temperature_pos=TAU_POS,
                              sapo_temperature_neg=TAU_NEG)
    exp_loss, exp_metrics = reference(logp, old, ref, adv, mask, beta, 0.2, 0.2 if eps_high is None else eps_high,
                                      loss_type, 12, level=level, delta=delta, corrected=corrected)
    assert_close(loss, exp_loss, rtol=1e-10, name="loss")
    assert_close(torch.autograd.grad(loss, logp)[0], torch.autograd.grad(exp_loss, logp)[0], rtol=1e-10,
                 name="d loss / d logprobs")
    assert set(metrics) == set(exp_metrics)
    for key, value in exp_metrics.items():
        assert metrics[key].item() == pytest.approx(value, rel=1e-10, abs=1e-12), key
    if loss_type in CLIPPED:
        assert exp_metrics["clip_ratio/region_mean"] > 0


def test_delta_caps_the_loss_of_a_negative_advantage():
    """Two-sided clipping: for A < 0 and ρ > δ the loss is δ·|A| and its gradient 0 (without δ: ρ·|A|)."""
    logp = torch.tensor([[0.0, -1.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)  # ρ = e ≈ 2.72 and 1
    adv, mask = torch.tensor([-2.0], dtype=torch.float64), torch.ones(1, 2)
    loss, _ = grpo_loss(logp, old, None, adv, mask, loss_type="bnpo", delta=1.5)
    assert loss.item() == pytest.approx((1.5 * 2 + 1 * 2) / 2)
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad[0, 0].item() == 0 and grad[0, 1].item() == pytest.approx(1.0)


def test_ref_may_be_none_when_beta_zero_and_old_none_means_on_policy():
    logp, _, ref, adv, mask = make_inputs(4)
    loss, metrics = grpo_loss(logp, None, None, adv, mask, loss_type="bnpo")
    assert "kl" not in metrics and metrics["clip_ratio/region_mean"].item() == 0
    exp_loss, _ = reference(logp, logp.detach(), ref, adv, mask, 0.0, 0.2, 0.2, "bnpo", T)
    assert_close(loss, exp_loss, rtol=1e-10, name="loss")
    assert_close(torch.autograd.grad(loss, logp)[0], torch.autograd.grad(exp_loss, logp)[0], rtol=1e-10,
                 name="grad")


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_corrected_kl_changes_the_on_policy_gradient_only(level):
    """On-policy ρ = 1 in value, but its gradient counts: the corrected KL has the same value, another gradient
    (TRL's note on use_bias_correction_kl)."""
    logp, _, ref, adv, mask = make_inputs(8)
    out = {c: grpo_loss(logp, None, ref, adv, mask, beta=0.1, importance_sampling_level=level,
                        use_bias_correction_kl=c) for c in (False, True)}
    assert_close(out[True][0], out[False][0], rtol=1e-12, name="loss")
    g = {c: torch.autograd.grad(out[c][0], logp)[0] for c in out}
    assert (g[True] - g[False]).abs().max() > 1e-4


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_all_masked_gives_zero_without_nan(loss_type):
    logp, old, ref, adv, _ = make_inputs(5)
    for level in ("token", "sequence"):
        # (CISPO caps ρ itself: an empty completion's ρ = 1 is above a cap of 0.2, TRL counts it; 5 is its usual cap)
        loss, metrics = grpo_loss(logp, old, ref, adv, torch.zeros(B, T), beta=0.1, loss_type=loss_type,
                                  importance_sampling_level=level, epsilon_high=5.0 if loss_type == "cispo" else None)
        assert loss.item() == 0 and (torch.autograd.grad(loss, logp)[0] == 0).all()
        assert all(v.item() == 0 for v in metrics.values())


@pytest.mark.parametrize("loss_type,variant", [(lt, v) for lt in LOSS_TYPES for v in variants_for(lt)])
@pytest.mark.parametrize("beta", [0.0, 0.04], ids=["beta0", "beta0.04"])
def test_matches_trl(loss_type, variant, beta):
    GRPOTrainer = import_trl("trl", "GRPOTrainer")
    level, delta, corrected = VARIANTS[variant]
    logp, old, ref, adv, mask = make_inputs(6)
    max_len = 10
    args = type("Args", (), {"use_bias_correction_kl": corrected, "delta": delta, "sapo_temperature_pos": TAU_POS,
                             "sapo_temperature_neg": TAU_NEG, "steps_per_generation": 1})()
    me = trainer(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        args=args, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, use_vllm=False,
        _entropy_bonus_enabled=False, max_completion_length=max_len, current_gradient_accumulation_steps=1,
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.ones_like(logp), None))
    inputs = {"prompt_ids": torch.ones(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.ones(B, T, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    trl_loss = GRPOTrainer._compute_loss(me, None, inputs)
    loss, metrics = grpo_loss(logp, old, ref, adv, mask, beta=beta, epsilon=0.2, epsilon_high=0.28,
                              loss_type=loss_type, max_completion_length=max_len, importance_sampling_level=level,
                              delta=delta, use_bias_correction_kl=corrected, sapo_temperature_pos=TAU_POS,
                              sapo_temperature_neg=TAU_NEG)
    assert_close(loss, trl_loss, rtol=1e-10, name="loss vs TRL")
    assert_close(torch.autograd.grad(loss, logp)[0], torch.autograd.grad(trl_loss, logp)[0], rtol=1e-10,
                 name="grad vs TRL")
    # TRL reduces its logged metrics through a float32 token count, so they carry float32 rounding.
    logged = me._metrics["eval"]
    keys = [k for k in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "cispo_clip_ratio")
            if k in logged] + (["kl"] if beta else [])
    assert (keys or loss_type == "sapo") and set(keys) <= set(metrics)  # TRL logs no ratio metric for SAPO
    for key in keys:
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
