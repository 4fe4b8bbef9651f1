"""Pairwise reward-model loss (Bradley-Terry), with an optional margin and reward centring.

Ouyang et al., "Training language models to follow instructions with human feedback" (InstructGPT),
2022, https://arxiv.org/abs/2203.02155, Eq. 1; the margin as in Llama 2 (Touvron et al. 2023,
https://arxiv.org/abs/2307.09288, Eq. 2); the centring term of Eisenstein et al. 2023,
https://arxiv.org/abs/2312.09244, as TRL's RewardTrainer adds it:

    loss = mean_b(−log σ(r_c − r_r − m)) + c·mean_b((r_c + r_r)²)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from alignfast.losses._reductions import batch_mean
from alignfast.losses._validation import check_finite, check_floats, compute_dtype


def reward_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, *,
                margin: torch.Tensor | float | None = None, center_rewards_coefficient: float | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry loss of a reward model on preference pairs.

    Args:
        chosen_scores: [B] scalar rewards r_c of the chosen completions.
        rejected_scores: [B] scalar rewards r_r of the rejected completions.
        margin: m, a float or [B] per-pair margins (constant); None for no margin.
        center_rewards_coefficient: c, the weight of mean((r_c + r_r)²); None for none.

    Returns:
        (loss, metrics): loss a 0-dim tensor; metrics detached 0-dim tensors as TRL logs them:
        ``accuracy`` (fraction r_c > r_r), ``margin`` (mean r_c − r_r), ``min_reward``,
        ``mean_reward``, ``max_reward`` (over chosen and rejected scores).
    """
    check_floats({"chosen_scores": chosen_scores, "rejected_scores": rejected_scores}, ndim=1)
    if center_rewards_coefficient is not None:
        check_finite("center_rewards_coefficient", center_rewards_coefficient)
    dtype = compute_dtype(chosen_scores, rejected_scores)
    chosen, rejected = chosen_scores.to(dtype), rejected_scores.to(dtype)
    diff = chosen - rejected
    logits = diff
    if margin is not None:
        if isinstance(margin, torch.Tensor):
            check_floats({"margin": margin}, ndim=(0, 1), same_shape=False)
            if margin.dim() == 1 and margin.shape != chosen.shape:
                raise ValueError(f"margin must be a float, 0-dim or [B]={tuple(chosen.shape)}, "
                                 f"got shape {tuple(margin.shape)}")
            margin = margin.detach().to(device=chosen.device, dtype=dtype)
        else:
            check_finite("margin", margin)
        logits = diff - margin
    loss = batch_mean(-F.logsigmoid(logits))
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * batch_mean((chosen + rejected).square())
    with torch.no_grad():  # an empty batch: loss and metrics 0
        both = torch.cat((chosen, rejected))
        metrics = {
            "accuracy": batch_mean((diff > 0).to(dtype)),
            "margin": batch_mean(diff),
            "min_reward": both.min() if both.numel() else both.new_zeros(()),
            "mean_reward": batch_mean(both),
            "max_reward": both.max() if both.numel() else both.new_zeros(()),
        }
    return loss, metrics
