"""GRPO's token loss and its TRL variants: the clipped surrogate (or CISPO's / SAPO's), an optional k3 KL
penalty, token- or sequence-level importance ratios, and the normalisers of each loss type.

Shao et al., "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models"
(GRPO), 2024, https://arxiv.org/abs/2402.03300. Per token, with the importance ratio ρ, the sequence's
group-relative advantage A and the reference log-prob:

    l_t = −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A) + β·w·k3_t,   k3_t = exp(ref − logp) − (ref − logp) − 1

ρ = exp(log π − log π_old) per token, or with `importance_sampling_level="sequence"` (GSPO, Zheng et al.
2025, https://arxiv.org/abs/2507.18071) exp of the sequence's mean log-ratio, the same for all its
tokens. `delta` (two-sided GRPO) caps ρ at δ in the unclipped term: for A < 0 the loss stops growing
at δ·|A|. w = ρ with `use_bias_correction_kl` (TRL's default since DeepSeek-V3.2, https://arxiv.org/abs/
2512.02556: the KL gradient becomes the unbiased reverse-KL one; ρ's gradient counts even where ρ = 1),
else 1. Two loss types replace the clipped surrogate:

    cispo    l_t = −sg(min(ρ, ε_high))·A·log π_t            CISPO, MiniMax-M1 2025, https://arxiv.org/abs/2506.13585
    sapo     l_t = −σ(τ·(ρ − 1))·(4/τ)·A, τ = τ_pos (A > 0) or τ_neg    SAPO, https://arxiv.org/abs/2511.20347

The loss types differ otherwise in how Σ l_t·m_t is normalised (TRL's `GRPOTrainer` loss types):

    grpo, sapo     mean_b (Σ_t l·m / Σ_t m)             per-sequence mean, then batch mean (original GRPO)
    bnpo           Σ l·m / Σ m                           token mean over the local batch
    dr_grpo        Σ l·m / (B · max_completion_length)   Dr. GRPO, Liu et al. 2025, https://arxiv.org/abs/2503.20783
    dapo, cispo    Σ l·m / Σ m                           DAPO, Yu et al. 2025, https://arxiv.org/abs/2503.14476
    luspo          mean_b Σ_t l·m                        per-sequence sum, then batch mean

The clipped surrogate is one fused pass (`alignfast.losses.pg_token`: torch, Triton, C++ or CUDA);
the sequence-level ratio, the corrected KL, CISPO, SAPO and the normalisers are PyTorch on [B, T].

TRL's ``dapo`` and ``cispo`` divide by the token count of the whole generation batch across processes
and accumulation steps; for one batch on one process that is Σ m, which is what this function uses
(pass a pre-scaled loss yourself when accumulating). Every count is clamped at 1, so all-masked rows
contribute 0 and an all-masked batch gives loss 0.
"""
from __future__ import annotations

import torch

from alignfast.losses._reductions import batch_mean, masked_mean, masked_row_mean
from alignfast.losses._validation import (check_choice, check_floats, check_mask, check_nonnegative, check_positive,
                                          compute_dtype)
from alignfast.losses.kl import token_kl
from alignfast.losses.pg_token import CLIP_HIGH, CLIP_LOW, TokenLossOptions, pg_token_terms, resolve_backend

GRPO_LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo", "luspo", "cispo", "sapo")
CLIPPED_LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo", "luspo")  # the clipped surrogate
TOKEN_SUM_LOSS_TYPES = ("dapo", "bnpo", "cispo")                    # Σ over tokens / the batch's token count
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor | None, ref_logprobs: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, beta: float = 0.0, epsilon: float = 0.2,
              epsilon_high: float | None = None, loss_type: str = "dapo", max_completion_length: int | None = None,
              importance_sampling_level: str = "token", delta: float | None = None,
              use_bias_correction_kl: bool = True, sapo_temperature_pos: float = 1.0,
              sapo_temperature_neg: float = 1.05, backend: str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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
        epsilon_high: ε_high (DAPO's clip-higher); None means ε_low. For ``"cispo"``, the cap of ρ itself.
        loss_type: one of GRPO_LOSS_TYPES (see the module docstring).
        max_completion_length: the normaliser of ``dr_grpo``; None means T (the padded length).
        importance_sampling_level: ``"token"`` (ρ per token) or ``"sequence"`` (GSPO: one ρ per completion).
        delta: two-sided clipping's cap of ρ in the unclipped term (≥ 1 + ε_high; clipped loss types only).
        use_bias_correction_kl: weight each token's KL by ρ (TRL's default); False: the plain k3 penalty.
        sapo_temperature_pos, sapo_temperature_neg: SAPO's τ for A > 0 and A ≤ 0.
        backend: the clipped surrogate's token pass (`alignfast.losses.pg_token`): ``"auto"``, ``"torch"``,
            ``"triton"``, ``"cpp"`` or ``"cuda"``.

    Returns:
        (loss, metrics): loss a 0-dim tensor; metrics detached 0-dim tensors as TRL logs them: for the
        clipped types ``clip_ratio/low_mean`` (ρ < 1 − ε_low with A < 0), ``clip_ratio/high_mean``
        (ρ > 1 + ε_high with A > 0), ``clip_ratio/region_mean`` (either); for cispo ``cispo_clip_ratio``
        (ρ > ε_high with A > 0) — masked token means, or means over completions with sequence-level ρ;
        ``kl`` (the mean of the weighted k3, over tokens) when ref_logprobs is given.
    """
    check_choice("loss_type", loss_type, GRPO_LOSS_TYPES)
    check_choice("importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
    check_nonnegative("beta", beta)
    check_nonnegative("epsilon", epsilon)
    if epsilon_high is not None:
        check_nonnegative("epsilon_high", epsilon_high)
    eps_high = epsilon if epsilon_high is None else epsilon_high
    check_delta(delta, loss_type, eps_high)
    check_positive("sapo_temperature_pos", sapo_temperature_pos)
    check_positive("sapo_temperature_neg", sapo_temperature_neg)
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
    lp, adv = logprobs.to(dtype), advantages.to(dtype).detach()
    old = None if old_logprobs is None else old_logprobs.to(dtype).detach()
    ref = None if ref_logprobs is None else ref_logprobs.to(dtype).detach()
    m, valid = mask.to(dtype), mask != 0
    zero = lp.new_zeros(())
    a = torch.where(valid, adv if adv.dim() == 2 else adv[:, None], zero)
    per_sequence = importance_sampling_level == "sequence"
    corrected_kl = ref is not None and use_bias_correction_kl  # (the kl metric is the weighted one at β = 0 too)
    # the metrics of a per-sequence ρ are means over completions (TRL's [B, 1] tensors), unless A is per token
    over_rows = per_sequence and adv.dim() == 1
    metrics = {}

    if loss_type in CLIPPED_LOSS_TYPES and not per_sequence and not corrected_kl:
        # the classic token-level surrogate with its plain k3 penalty: all of it in one token pass
        terms = pg_token_terms(lp, old, ref, adv, mask, _token_options(epsilon, eps_high, delta, beta, backend, lp))
        per_token, kl = terms.loss, terms.kl
    else:
        lpv = torch.where(valid, lp, zero)  # masked positions compute on zeros (padding may hold −inf)
        log_w, row_log_w = _log_importance_weights(lpv, old, valid, m, per_sequence)
        kl = None
        if loss_type in CLIPPED_LOSS_TYPES:
            # the token pass on log ρ itself (against 0): the sequence's gradient reaches its tokens by autograd
            terms = pg_token_terms(log_w.contiguous(), torch.zeros_like(lp), None, adv, mask,
                                   _token_options(epsilon, eps_high, delta, 0.0, backend, lp))
            per_token = terms.loss
        else:
            ratio = torch.exp(log_w)
            if loss_type == "cispo":
                per_token = -ratio.clamp(max=eps_high).detach() * a * lpv
                with torch.no_grad():  # per sequence: every completion's ρ counts, an empty one's (1) too, as in TRL
                    metrics["cispo_clip_ratio"] = (
                        batch_mean(((torch.exp(row_log_w) > eps_high) & (adv > 0)).to(dtype)) if over_rows
                        else masked_mean(((ratio > eps_high) & (a > 0)).to(dtype), m))
            else:  # sapo
                tau = torch.where(a > 0, zero + sapo_temperature_pos, zero + sapo_temperature_neg)
                per_token = -torch.sigmoid(tau * (ratio - 1)) * (4 / tau) * a
            per_token = torch.where(valid, per_token, zero)
        if ref is not None:
            k3 = token_kl(lpv, torch.where(valid, ref, zero), "k3")
            kl = torch.where(valid, k3 * torch.exp(log_w) if corrected_kl else k3, zero)
            if beta:
                per_token = per_token + beta * kl
            kl = kl.detach()

    if loss_type in ("grpo", "sapo"):
        loss = batch_mean(masked_row_mean(per_token, m))
    elif loss_type == "dr_grpo":
        length = logprobs.shape[1] if max_completion_length is None else max_completion_length
        loss = (per_token * m).sum() / (max(logprobs.shape[0], 1) * max(length, 1))
    elif loss_type == "luspo":
        loss = (per_token * m).sum() / max(logprobs.shape[0], 1)
    else:  # bnpo, dapo, cispo: one batch on one process
        loss = masked_mean(per_token, m)

    with torch.no_grad():
        if loss_type in CLIPPED_LOSS_TYPES:
            low, high = ((terms.flags & bit) != 0 for bit in (CLIP_LOW, CLIP_HIGH))
            metrics["clip_ratio/low_mean"] = _flag_mean(low, valid, m, over_rows)
            metrics["clip_ratio/high_mean"] = _flag_mean(high, valid, m, over_rows)
            metrics["clip_ratio/region_mean"] = _flag_mean(low | high, valid, m, over_rows)
        if kl is not None:
            metrics["kl"] = masked_mean(kl, m)
    return loss, metrics


def check_delta(delta: float | None, loss_type: str, eps_high: float) -> None:
    """delta caps ρ in the clipped types' unclipped term; below 1 + ε_high it would cut into the clip itself."""
    if delta is None:
        return
    if loss_type not in CLIPPED_LOSS_TYPES:
        raise ValueError(f"delta (two-sided clipping) applies to the clipped loss types {list(CLIPPED_LOSS_TYPES)}, "
                         f"not loss_type={loss_type!r}")
    check_positive("delta", delta)
    if delta < 1.0 + eps_high:
        raise ValueError(f"delta must be >= 1 + epsilon_high = {1.0 + eps_high!r}, got {delta!r}")


def _token_options(epsilon, eps_high, delta, beta, backend, like: torch.Tensor) -> TokenLossOptions:
    # two-sided clipping is the dual clip: −min(min(ρ, δ)·A, clip(ρ)·A) = min(PPO's max(...), −δ·A) for A < 0
    return TokenLossOptions(ratio_low=1.0 - epsilon, ratio_high=1.0 + eps_high,
                            dual_clip=None if delta is None else float(delta), kl_estimator="k3",
                            kl_coef=float(beta), backend=resolve_backend(backend, like.device))


def _log_importance_weights(lpv, old, valid, m, per_sequence: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([B, T] log ρ, [B] per completion or None) from the masked log-probs `lpv`: per token (log π − log π_old;
    π_old = π detached on-policy; 0 at masked positions), or each completion's masked mean log-ratio on all
    its tokens."""
    log_ratio = lpv - (lpv.detach() if old is None else torch.where(valid, old, lpv.new_zeros(())))
    if per_sequence:
        row = masked_row_mean(log_ratio, m)
        return row[:, None].expand_as(lpv), row
    return log_ratio, None


def _flag_mean(flag: torch.Tensor, valid: torch.Tensor, m: torch.Tensor, over_rows: bool) -> torch.Tensor:
    """A [B, T] indicator's masked token mean, or (a per-sequence ρ) its mean over completions (an empty
    completion's ρ = 1 is never outside the clip range)."""
    if over_rows:
        return batch_mean((flag & valid).any(-1).to(m.dtype))
    return masked_mean(flag.to(m.dtype), m)
