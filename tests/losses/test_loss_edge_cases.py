"""The losses at the edges users reach: saturated log-ratios, empty batches, inference mode, bad options."""
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from alignfast.losses import (LinearDPOLoss, LinearGRPOLoss, LinearKTOLoss, LinearPPOLoss, cpo_loss, dpo_loss,
                              gae, grpo_loss, kto_loss, ppo_policy_loss, reward_loss, simpo_loss)
from alignfast.losses.dpo import F_DIVERGENCES

B, T, H, V = 4, 5, 8, 23


def rnd(*shape, seed=0, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).mul(scale).to(dtype)


def labels_of(rows=B, seed=1):
    labels = torch.randint(0, V, (rows, T), generator=torch.Generator().manual_seed(seed))
    labels[:, :2] = -100
    return labels


# --- saturated sequence log-ratios stay finite, with finite gradients -----------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["discopop", "forward_kl", "alpha_divergence"])
def test_dpo_with_huge_log_ratios_is_finite(case, dtype):
    """Long DPO runs push the rejected completions' log-ratios to hundreds of nats: exp(−u) overflows."""
    scale = 1000.0 if dtype == torch.float64 else 200.0
    pc = rnd(6, seed=2, dtype=dtype).mul(scale).requires_grad_()
    pr = rnd(6, seed=3, dtype=dtype).mul(scale).requires_grad_()
    rc, rr = rnd(6, seed=4, dtype=dtype), rnd(6, seed=5, dtype=dtype)
    kw = (dict(loss_type="discopop", beta=1.0) if case == "discopop"
          else dict(f_divergence=case, f_alpha_divergence_coef=0.3, beta=0.1))
    losses, _, _ = dpo_loss(pc, pr, rc, rr, **kw)
    losses.sum().backward()
    for t in (losses, pc.grad, pr.grad):
        assert torch.isfinite(t).all(), (case, t)


def test_discopop_stable_form_equals_the_paper_formula():
    z = torch.linspace(-30, 30, 61, dtype=torch.float64)
    tau = 0.05
    w = torch.sigmoid(z / tau)
    paper = (1 - w) * -F.logsigmoid(z) + w * torch.exp(-z)
    zero = torch.zeros_like(z)
    got, _, _ = dpo_loss(z, zero, zero, zero, beta=1.0, loss_type="discopop", discopop_tau=tau)
    assert_close(got, paper, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("name", ["forward_kl", "alpha_divergence"])
def test_capped_scores_are_exact_below_the_cap(name):
    u = torch.linspace(-60, 60, 41, dtype=torch.float64)
    want = {"forward_kl": 1 - torch.exp(-u), "alpha_divergence": (torch.exp(-0.5 * u) - 1) / -0.5}[name]
    assert_close(F_DIVERGENCES[name](u, 0.5), want, rtol=1e-12, atol=0)


def test_alphapo_with_long_completions_is_finite():
    chosen = (-300 + rnd(4, seed=6)).float().requires_grad_()
    rejected = (-320 + rnd(4, seed=7)).float().requires_grad_()
    losses, metrics = cpo_loss(chosen, rejected, None, alpha=1.0, cpo_alpha=0.0)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all()
    assert all(math.isfinite(float(v)) for v in metrics.values())


# --- empty batches: loss and metrics 0, never NaN --------------------------------------------------
def empty(*shape):
    return torch.zeros(0, *shape, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_ppo_on_an_empty_batch(loss_agg):
    lp = empty(T)
    loss, metrics = ppo_policy_loss(lp, empty(T).detach(), empty(T).detach(), torch.zeros(0, T), loss_agg=loss_agg)
    loss.backward()
    assert float(loss.detach()) == 0.0 and all(math.isfinite(float(v)) for v in metrics.values())


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "bnpo", "dapo"])
def test_grpo_on_an_empty_batch(loss_type):
    loss, metrics = grpo_loss(empty(T), None, None, empty().detach(), torch.zeros(0, T), loss_type=loss_type)
    assert float(loss.detach()) == 0.0 and all(math.isfinite(float(v)) for v in metrics.values())


def test_pair_losses_and_reward_model_on_an_empty_batch():
    _, metrics = simpo_loss(empty(), empty())
    assert metrics and all(float(v) == 0.0 for v in metrics.values())
    loss, metrics = reward_loss(empty(), empty(), center_rewards_coefficient=0.01)
    loss.backward()
    assert float(loss) == 0.0 and all(float(v) == 0.0 for v in metrics.values())


# --- inference mode ---------------------------------------------------------------------------------
def test_ppo_full_kl_under_inference_mode_equals_no_grad():
    labels = labels_of()
    args = (rnd(B, T, H), rnd(V, H, seed=1, scale=H**-0.5), labels, rnd(B, T, seed=2) - 3, rnd(B, T, seed=3))
    ref = dict(ref_hidden=rnd(B, T, H, seed=4), ref_weight=rnd(V, H, seed=5, scale=H**-0.5))
    loss_fn = LinearPPOLoss(kl_estimator="full", kl_coef=0.1, loss_agg="seq-mean-token-mean", backend="chunked")
    with torch.no_grad():
        want, want_metrics = loss_fn(*args, **ref)
    with torch.inference_mode():
        got, got_metrics = loss_fn(*args, **ref)
    assert_close(got, want, rtol=1e-12, atol=0)
    assert_close(got_metrics["kl"], want_metrics["kl"], rtol=1e-12, atol=0)


# --- bad options and inputs name the argument -------------------------------------------------------
@pytest.mark.parametrize("make,match", [
    (lambda: LinearPPOLoss(kl_coef=-0.5, kl_estimator="full"), "kl_coef"),
    (lambda: LinearPPOLoss(kl_coef=float("nan")), "kl_coef"),
    (lambda: LinearPPOLoss(entropy_coef=float("nan")), "entropy_coef"),
    (lambda: LinearPPOLoss(entropy_coef="x"), "entropy_coef"),
    (lambda: LinearGRPOLoss(max_completion_length=0), "max_completion_length"),
])
def test_bad_module_options(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("module", ["dpo", "kto", "grpo", "ppo"])
def test_reference_head_with_another_vocabulary(module):
    labels = labels_of()
    h, w = rnd(B, T, H), rnd(V, H, seed=1)
    ref = dict(ref_hidden=rnd(B, T, H, seed=2), ref_weight=rnd(V + 5, H, seed=3))
    call = {
        "dpo": lambda: LinearDPOLoss()(h, w, labels, **ref),
        "kto": lambda: LinearKTOLoss()(h, w, labels, torch.tensor([True, False, True, False]), kl=0.0, **ref),
        "grpo": lambda: LinearGRPOLoss(beta=0.1)(h, w, labels, rnd(B, seed=4), **ref),
        "ppo": lambda: LinearPPOLoss(kl_coef=0.1)(h, w, labels, rnd(B, T, seed=5), rnd(B, T, seed=6), **ref),
    }[module]
    with pytest.raises(ValueError, match=r"ref_weight \(28, 8\) must be \[V, H_ref\].*V=23"):
        call()


def test_non_tensor_inputs_are_type_errors():
    labels = labels_of()
    with pytest.raises(TypeError, match="hidden must be a torch.Tensor"):
        LinearDPOLoss()(rnd(B, T, H).tolist(), rnd(V, H), labels, ref_logps=rnd(B))
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        LinearKTOLoss()(rnd(B, T, H), rnd(V, H), labels.tolist(), torch.ones(B, dtype=torch.bool), ref_logps=rnd(B))
    with pytest.raises(TypeError, match="ref_logps must be a torch.Tensor"):
        LinearDPOLoss()(rnd(B, T, H), rnd(V, H), labels, ref_logps=[0.0] * B)


def test_shape_errors_name_the_arguments_given():
    """KTO's KL batch was reported as "hidden ... labels"; PPO/GRPO with flat [N] labels said old_logprobs
    (or advantages) must be [B]=(N,)."""
    labels, h, w = labels_of(), rnd(B, T, H), rnd(V, H, seed=1)
    with pytest.raises(ValueError, match=r"kl_hidden \(4, 3, 8\) does not match kl_labels \(4, 5\)"):
        LinearKTOLoss()(h, w, labels, torch.tensor([True, False, True, False]), ref_logps=rnd(B),
                        kl_hidden=rnd(B, 3, H), kl_labels=labels, ref_kl_logps=rnd(B))
    flat = labels.reshape(-1)
    with pytest.raises(ValueError, match=r"expected hidden \[B, T, H\] and labels \[B, T\]"):
        LinearPPOLoss()(h.reshape(-1, H), w, flat, rnd(B * T), rnd(B * T))
    with pytest.raises(ValueError, match=r"expected hidden \[B, T, H\] and labels \[B, T\]"):
        LinearGRPOLoss()(h.reshape(-1, H), w, flat, rnd(B * T))


def test_desirability_labels_must_be_binary():
    with pytest.raises(ValueError, match=r"desirable must be bool \(or 0/1 integers\), got torch.float"):
        LinearKTOLoss()(rnd(B, T, H), rnd(V, H), labels_of(), torch.tensor([0.2, 1.0, 0.0, 1.0]), kl=0.0,
                        ref_logps=rnd(B))
    with pytest.raises(ValueError, match=r"labels must be bool.*holding \[-1, 2\]"):
        kto_loss(rnd(4), rnd(4, seed=1), torch.tensor([2, 1, -1, 0]), 0.0)


@pytest.mark.parametrize("kl", [float("nan"), float("inf"), torch.tensor(float("nan")), "x"])
def test_kto_reference_point_must_be_finite(kl):
    with pytest.raises(ValueError, match="kl must be a finite"):
        kto_loss(rnd(4), rnd(4, seed=1), torch.tensor([True, False, True, False]), kl)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), torch.tensor(float("inf"))])
def test_bco_running_mean_must_be_finite(value):
    with pytest.raises(ValueError, match="bco_running_mean must be a finite"):
        dpo_loss(rnd(3), rnd(3, seed=1), rnd(3, seed=2), rnd(3, seed=3), loss_type="bco_pair", bco_running_mean=value)


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_masks_hold_nonnegative_finite_weights(bad):
    mask = torch.ones(B, T)
    mask[1, 2] = bad
    with pytest.raises(ValueError, match="mask must hold weights >= 0"):
        ppo_policy_loss(rnd(B, T), rnd(B, T, seed=1), rnd(B, T, seed=2), mask)
    with pytest.raises(ValueError, match="mask must hold weights >= 0"):
        gae(rnd(B, T), rnd(B, T, seed=1), mask)
