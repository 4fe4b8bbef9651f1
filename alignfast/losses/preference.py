"""Reference-free preference losses: SimPO, ORPO and CPO.

None of them needs a reference model; each works on the policy's sequence log-probs of the
chosen and rejected completions (summed or length-averaged as each method defines) and returns
per-pair losses [B] plus a dict of detached 0-dim metrics, named as TRL logs them
(``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``, ...).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from alignfast.losses._validation import (check_choice, check_finite, check_floats, check_label_smoothing,
                                          check_lengths, check_nonnegative, check_positive, compute_dtype)
from alignfast.losses._numerics import capped_expm1
from alignfast.losses._reductions import batch_mean

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


def _smoothed_sigmoid(logits: torch.Tensor, eps: float) -> torch.Tensor:
    """−(1 − ε)·log σ(z) − ε·log σ(−z)."""
    return -(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


def _reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {  # means over the pairs (0 for an empty batch)
        "rewards/chosen": batch_mean(chosen_rewards),
        "rewards/rejected": batch_mean(rejected_rewards),
        "rewards/margins": batch_mean(chosen_rewards - rejected_rewards),
        "rewards/accuracies": batch_mean((chosen_rewards > rejected_rewards).to(chosen_rewards.dtype)),
    }


def _check_nll(chosen_nll, like: torch.Tensor) -> None:
    """chosen_nll is a 0-dim tensor (TRL's batch mean) or [B] (one per pair)."""
    check_floats({"chosen_nll": chosen_nll}, ndim=(0, 1), same_shape=False)
    if chosen_nll.dim() == 1 and chosen_nll.shape != like.shape:
        raise ValueError(f"chosen_nll must be 0-dim or [B]={tuple(like.shape)}, got shape {tuple(chosen_nll.shape)}")
    if chosen_nll.device != like.device:
        raise ValueError(f"chosen_nll is on {chosen_nll.device} but the log-probs are on {like.device}")


def simpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, *, beta: float = 2.0,
               gamma: float = 0.5, label_smoothing: float = 0.0, chosen_lengths: torch.Tensor | None = None,
               rejected_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO: the logistic loss on the length-averaged log-prob margin, minus a target margin γ.

    Meng, Xia and Chen, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    NeurIPS 2024, https://arxiv.org/abs/2405.14734, Eq. 6:

        l = −log σ(β/|y_c|·log π(y_c|x) − β/|y_r|·log π(y_r|x) − γ)

    with label_smoothing ε: −(1−ε)·log σ(z) − ε·log σ(−z) (as the SimPO code and TRL's CPOTrainer).

    Args:
        policy_chosen_logps, policy_rejected_logps: [B] log π of the completions: length-averaged
            already, or summed when chosen_lengths / rejected_lengths ([B] token counts) are given.
        beta: β > 0, the reward scale.
        gamma: γ ≥ 0, the target reward margin (the paper's γ, TRL's simpo_gamma; not γ/β).
        label_smoothing: ε ∈ [0, 0.5).

    Returns:
        (losses [B], metrics) with rewards β·(average log-prob) as ``rewards/*``.
    """
    check_positive("beta", beta)
    check_nonnegative("gamma", gamma)
    check_label_smoothing(label_smoothing)
    check_floats({"policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps},
                 ndim=1)
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("pass both chosen_lengths and rejected_lengths (summed log-probs) or neither "
                         "(log-probs already length-averaged)")
    dtype = compute_dtype(policy_chosen_logps, policy_rejected_logps)
    chosen, rejected = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    if chosen_lengths is not None:
        batch, device = chosen.shape[0], chosen.device
        check_lengths("chosen_lengths", chosen_lengths, batch, device)
        check_lengths("rejected_lengths", rejected_lengths, batch, device)
        chosen = chosen / chosen_lengths.to(dtype).clamp(min=1.0)
        rejected = rejected / rejected_lengths.to(dtype).clamp(min=1.0)
    losses = _smoothed_sigmoid(beta * (chosen - rejected) - gamma, label_smoothing)
    return losses, _reward_metrics(beta * chosen, beta * rejected)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, accurate on both sides of −log 2 (Mächler 2012), NaN-free gradients."""
    cut = -math.log(2.0)
    return torch.where(x < cut, torch.log1p(-torch.exp(x.clamp(max=cut))), torch.log(-torch.expm1(x.clamp(min=cut))))


def orpo_loss(chosen_logps_avg: torch.Tensor, rejected_logps_avg: torch.Tensor, chosen_nll: torch.Tensor, *,
              beta: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO: the chosen NLL plus β times the log odds-ratio loss.

    Hong, Lee and Thorne, "ORPO: Monolithic Preference Optimization without Reference Model",
    EMNLP 2024, https://arxiv.org/abs/2403.07691, Eqs. 4-7. With P = exp(average log-prob) and
    odds(y) = P/(1 − P):

        log_odds = (log P_c − log P_r) − (log(1 − P_c) − log(1 − P_r))
        l = NLL_c − β·log σ(log_odds)

    Args:
        chosen_logps_avg, rejected_logps_avg: [B] length-averaged log π of the completions (< 0; a 0,
            an empty completion's, is taken as the largest float below it).
        chosen_nll: the SFT loss on the chosen completions: a 0-dim tensor (TRL: the token mean over
            the batch, prompt included) or [B].
        beta: β > 0 (the paper's λ).

    Returns:
        (losses [B], metrics): losses.mean() is TRL's ORPO loss. Metrics: ``rewards/*`` with
        rewards β·(average log-prob) (as TRL), ``log_odds_ratio`` (mean log σ(log_odds)),
        ``log_odds_chosen`` (mean log_odds), ``nll_loss``.
    """
    check_positive("beta", beta)
    check_floats({"chosen_logps_avg": chosen_logps_avg, "rejected_logps_avg": rejected_logps_avg}, ndim=1)
    _check_nll(chosen_nll, chosen_logps_avg)
    dtype = compute_dtype(chosen_logps_avg, rejected_logps_avg, chosen_nll)
    # P = 1 (an average log-prob of 0: an empty completion) has infinite odds: cap it at the largest
    # P below 1, so an empty completion's pair stays finite (both empty: log_odds = 0); nothing else moves.
    top = -torch.finfo(dtype).tiny
    chosen, rejected = chosen_logps_avg.to(dtype).clamp(max=top), rejected_logps_avg.to(dtype).clamp(max=top)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    nll = chosen_nll.to(dtype)
    losses = nll - beta * ratio
    metrics = _reward_metrics(beta * chosen, beta * rejected)
    metrics.update({"log_odds_ratio": batch_mean(ratio.detach()), "log_odds_chosen": batch_mean(log_odds.detach()),
                    "nll_loss": batch_mean(nll.detach())})
    return losses, metrics


def cpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             chosen_nll: torch.Tensor | None = None, *, beta: float = 0.1, label_smoothing: float = 0.0,
             loss_type: str = "sigmoid", simpo_gamma: float = 0.5, cpo_alpha: float = 1.0, alpha: float = 0.0
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CPO: a reference-free DPO-style preference term plus a behaviour-cloning NLL on the chosen.

    Xu et al., "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in
    Machine Translation", ICML 2024, https://arxiv.org/abs/2401.08417, Eq. 3, with TRL's CPOTrainer
    loss types. With z = log π(y_c) − log π(y_r):

        sigmoid  −(1−ε)·log σ(βz) − ε·log σ(−βz)
        hinge    max(0, 1 − βz)
        ipo      (z − 1/(2β))²
        simpo    −(1−ε)·log σ(βz − γ) − ε·log σ(−(βz − γ))     (CPO-SimPO; pass length-averaged log-probs)
        l = preference term + cpo_alpha·NLL_c

    AlphaPO (Gupta et al. 2025, https://arxiv.org/abs/2501.03884), alpha ≠ 0, replaces each log π by
    the reward (1 − π^(−α))/α before forming z.

    Args:
        policy_chosen_logps, policy_rejected_logps: [B] log π of the completions (summed for sigmoid/hinge,
            length-averaged for ipo/simpo, as TRL's CPOTrainer computes them).
        chosen_nll: NLL of the chosen completions, 0-dim (TRL: token mean over the batch) or [B];
            required unless cpo_alpha == 0.
        beta: β > 0. label_smoothing: ε ∈ [0, 0.5) (sigmoid, simpo). loss_type: one of `CPO_LOSS_TYPES`.
        simpo_gamma: γ ≥ 0 of the simpo type. cpo_alpha: weight ≥ 0 of the NLL. alpha: AlphaPO's α.

    Returns:
        (losses [B], metrics): losses.mean() is TRL's CPO loss. Metrics: ``rewards/*`` (β times the
        log-probs, or β times the AlphaPO rewards) and ``nll_loss``.
    """
    check_positive("beta", beta)
    check_label_smoothing(label_smoothing)
    check_choice("loss_type", loss_type, CPO_LOSS_TYPES)
    check_nonnegative("simpo_gamma", simpo_gamma)
    check_nonnegative("cpo_alpha", cpo_alpha)
    check_finite("alpha", alpha)
    check_floats({"policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps},
                 ndim=1)
    if cpo_alpha != 0 and chosen_nll is None:
        raise ValueError(f"chosen_nll is required when cpo_alpha != 0 (got cpo_alpha={cpo_alpha!r})")
    if chosen_nll is not None:
        _check_nll(chosen_nll, policy_chosen_logps)
    dtype = compute_dtype(policy_chosen_logps, policy_rejected_logps, chosen_nll)
    chosen, rejected = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    if alpha != 0.0:  # AlphaPO: r = (1 − exp(−α·log π))/α
        chosen, rejected = -capped_expm1(-alpha * chosen) / alpha, -capped_expm1(-alpha * rejected) / alpha
    z = chosen - rejected
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid(beta * z, label_smoothing)
    elif loss_type == "simpo":
        losses = _smoothed_sigmoid(beta * z - simpo_gamma, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * z)
    else:  # ipo
        losses = (z - 1.0 / (2.0 * beta)).square()
    metrics = _reward_metrics(beta * chosen, beta * rejected)
    if cpo_alpha != 0:
        nll = chosen_nll.to(dtype)
        losses = losses + cpo_alpha * nll
        metrics["nll_loss"] = batch_mean(nll.detach())
    else:
        metrics["nll_loss"] = z.new_zeros(())
    return losses, metrics
