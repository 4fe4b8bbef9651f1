"""GRPO's clipped token loss with an optional k3 KL penalty, and the normalisers of its variants.

Shao et al., "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models"
(GRPO), 2024, https://arxiv.org/abs/2402.03300. Per token, with ρ = exp(log π − log π_old),
the sequence's group-relative advantage A and the reference log-prob:

    l_t = −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A) + β·k3_t,
    k3_t = exp(ref − logp) − (ref − logp) − 1

The variants differ only in how Σ l_t·m_t is normalised (TRL's `GRPOTrainer` loss types):

    grpo     mean_b (Σ_t l·m / Σ_t m)                   per-sequence mean, then batch mean (original GRPO)
    bnpo     Σ l·m / Σ m                                 token mean over the local batch
    dr_grpo  Σ l·m / (B · max_completion_length)         Dr. GRPO, Liu et al. 2025, https://arxiv.org/abs/2503.20783
    dapo     Σ l·m / Σ m                                 DAPO, Yu et al. 2025, https://arxiv.org/abs/2503.14476

The per-token arithmetic is one fused pass (`alignfast.losses.pg_token`: torch, Triton, C++ or
CUDA); the normalisers below stay in PyTorch.

TRL's ``dapo`` divides by the token count of the whole generation batch across processes and
accumulation steps; for one batch on one process that is Σ m, which is what this function uses
(pass a pre-scaled loss yourself when accumulating). Every count is clamped at 1, so all-masked
rows contribute 0 and an all-masked batch gives loss 0.
"""
from __future__ import annotations

import torch

from alignfast.losses._reductions import batch_mean, masked_mean, masked_row_mean
from alignfast.losses._validation import (check_choice, check_floats, check_mask, check_nonnegative, check_positive,
                                          compute_dtype)
from alignfast.losses.pg_token import CLIP_HIGH, CLIP_LOW, TokenLossOptions, pg_token_terms, resolve_backend

GRPO_LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo")


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor | None, ref_logprobs: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, beta: float = 0.0, epsilon: float = 0.2,
              epsilon_high: float | None = None, loss_type: str = "dapo", max_completion_length: int | None = None,
              backend: str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss of one batch of completions.

    Args:
        logprobs: [B, T] log π of the completion tokens under the policy being trained.
        old_logprobs: [B, T] log π_old of the rollout policy, or None when the batch is on-policy
            (then π_old = π detached: ρ = 1 and only the gradient of ρ·A remains, as in TRL).
        ref_logprobs: [B, T] reference log-probs; required when beta > 0, may be None when beta == 0.
        advantages: [B] one advantage per completion (or [B, T] per token).
        mask: [B, T] nonzero on the completion tokens that count.
        beta: weight of the k3 KL penalty (≥ 0).
        epsilon: ε_low of the ratio clip.
        epsilon_high: ε_high (DAPO's clip-higher); None means ε_low.
        loss_type: ``"dapo"``, ``"grpo"``, ``"bnpo"`` or ``"dr_grpo"`` (see the module docstring).
        max_completion_length: the normaliser of ``dr_grpo``; None means T (the padded length).
        backend: the token pass (`alignfast.losses.pg_token`): ``"auto"``, ``"torch"``, ``"triton"``,
            ``"cpp"`` or ``"cuda"``.

    Returns:
        (loss, metrics): loss a 0-dim tensor; metrics detached 0-dim tensors, masked token means as
        TRL logs them: ``clip_ratio/low_mean`` (ρ < 1 − ε_low with A < 0), ``clip_ratio/high_mean``
        (ρ > 1 + ε_high with A > 0), ``clip_ratio/region_mean`` (either), and ``kl`` (mean k3) when
        ref_logprobs is given.
    """
    check_choice("loss_type", loss_type, GRPO_LOSS_TYPES)
    check_nonnegative("beta", beta)
    check_nonnegative("epsilon", epsilon)
    if epsilon_high is not None:
        check_nonnegative("epsilon_high", epsilon_high)
    if beta > 0 and ref_logprobs is None:
        raise ValueError(f"ref_logprobs is required when beta > 0 (got beta={beta!r} and ref_logprobs=None)")
    check_floats({"logprobs": logprobs, "old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs}, ndim=2)
    check_floats({"advantages": advantages}, ndim=(1, 2))
    if advantages.shape not in (logprobs.shape, logprobs.shape[:1]):
        raise ValueError(f"advantages must be [B]=({logprobs.shape[0]},) or [B, T]={tuple(logprobs.shape)}, "
                         f"got shape {tuple(advantages.shape)}")
    check_mask(mask, logprobs, like_name="logprobs")
    if max_completion_length is not None:
        if isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int):
            raise ValueError(f"max_completion_length must be a positive int, got {max_completion_length!r}")
        check_positive("max_completion_length", max_completion_length)

    dtype = compute_dtype(logprobs, old_logprobs, ref_logprobs, advantages)
    eps_high = epsilon if epsilon_high is None else epsilon_high
    opts = TokenLossOptions(ratio_low=1.0 - epsilon, ratio_high=1.0 + eps_high, kl_estimator="k3",
                            kl_coef=float(beta), backend=resolve_backend(backend, logprobs.device))
    terms = pg_token_terms(logprobs.to(dtype), None if old_logprobs is None else old_logprobs.to(dtype),
                           None if ref_logprobs is None else ref_logprobs.to(dtype), advantages.to(dtype), mask, opts)
    per_token = terms.loss
    m = mask.to(dtype)

    if loss_type == "grpo":
        loss = batch_mean(masked_row_mean(per_token, m))
    elif loss_type == "dr_grpo":
        length = logprobs.shape[1] if max_completion_length is None else max_completion_length
        loss = (per_token * m).sum() / (max(logprobs.shape[0], 1) * max(length, 1))
    else:  # bnpo, dapo: one batch on one process
        loss = masked_mean(per_token, m)

    with torch.no_grad():
        metrics = {
            "clip_ratio/low_mean": terms.flag_mean(CLIP_LOW, m),
            "clip_ratio/high_mean": terms.flag_mean(CLIP_HIGH, m),
            "clip_ratio/region_mean": terms.flag_mean(CLIP_LOW | CLIP_HIGH, m),
        }
        if terms.kl is not None:
            metrics["kl"] = masked_mean(terms.kl, m)
    return loss, metrics
