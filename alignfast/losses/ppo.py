"""PPO's clipped policy surrogate (with optional asymmetric and dual clipping) and clipped value loss.

Schulman et al., "Proximal Policy Optimization Algorithms", 2017, https://arxiv.org/abs/1707.06347.
Per token, with ratio ρ = exp(log π − log π_old) and advantage A:

    l_t = max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high))                  (clipped surrogate, negated)

ε_high ≠ ε_low is DAPO's "clip-higher" (Yu et al. 2025, https://arxiv.org/abs/2503.14476).
Dual-clip PPO (Ye et al., "Mastering Complex Control in MOBA Games with Deep Reinforcement
Learning", AAAI 2020, https://arxiv.org/abs/1912.09729) also bounds the loss for A < 0, where
ρ → ∞ would otherwise make −A·ρ unbounded: the objective max(min(ρA, clip(ρ)A), c·A) with c > 1,
i.e. the loss

    l_t = min(l_t, −c·A)    for A < 0.

An optional per-token KL penalty to a reference (InstructGPT's, Ouyang et al. 2022,
https://arxiv.org/abs/2203.02155) adds kl_coef·KL_t, KL_t a `token_kl` estimator. The per-token
arithmetic is one fused pass (`alignfast.losses.pg_token`: torch, Triton, C++ or CUDA); the
reduction over tokens stays here.

The value loss (the PPO2 / OpenAI baselines form):

    v_clip = V_old + clip(V − V_old, −clip, +clip)
    l_t = ½ · max((V − R)², (v_clip − R)²)
"""
from __future__ import annotations

import torch

from alignfast.losses._reductions import LOSS_AGG_MODES, aggregate, masked_mean
from alignfast.losses._validation import (check_choice, check_floats, check_mask, check_nonnegative, check_positive,
                                          compute_dtype)
from alignfast.losses.kl import KL_ESTIMATORS
from alignfast.losses.pg_token import CLIPPED, DUAL_CLIPPED, TokenLossOptions, pg_token_terms, resolve_backend

# log ρ is clamped to this range before the exp (as verl does), so a stale old log-prob cannot
# overflow the ratio; inside it the clamp is the identity.
LOG_RATIO_CLAMP = 20.0


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, *, clip_eps: float = 0.2, clip_eps_high: float | None = None,
                    dual_clip: float | None = None, loss_agg: str = "token-mean",
                    ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0, kl_estimator: str = "k1",
                    backend: str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped policy loss (+ an optional per-token KL penalty) over the valid tokens.

    Args:
        logprobs: [B, T] log π(a_t) of the policy being trained (differentiable).
        old_logprobs: [B, T] log π_old(a_t) of the rollout policy (treated as constant).
        advantages: [B, T] per-token advantages, or [B] one per sequence (treated as constant).
        mask: [B, T] nonzero on the tokens that count.
        clip_eps: ε_low; the ratio is clipped to [1 − ε_low, 1 + ε_high].
        clip_eps_high: ε_high (DAPO's clip-higher); None means ε_low.
        dual_clip: the dual-clip constant c > 1 (None: no dual clip).
        loss_agg: ``"token-mean"`` (Σ l·m / Σ m), ``"seq-mean-token-sum"`` (mean_b Σ_t l·m) or
            ``"seq-mean-token-mean"`` (mean_b of each sequence's token mean), as verl/OpenRLHF define them.
        ref_logprobs: [B, T] reference log-probs (constant), for the KL penalty and the ``kl`` metric.
        kl_coef: weight of the per-token KL penalty: l_t += kl_coef·KL_t (needs ref_logprobs when > 0).
        kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"``, as in `token_kl`.
        backend: the token pass (`alignfast.losses.pg_token`): ``"auto"``, ``"torch"``, ``"triton"``,
            ``"cpp"`` or ``"cuda"``.

    Returns:
        (loss, metrics): loss is a 0-dim tensor; metrics hold detached 0-dim tensors, each a
        masked token mean: ``clipfrac`` (tokens where the clipped term is the larger loss),
        ``approx_kl`` (k3 estimate of KL(π_old‖π): ρ − 1 − log ρ), ``ratio_mean``, and
        ``dual_clipfrac`` when dual_clip is set; with ref_logprobs also ``kl`` (mean KL_t) and
        ``policy_loss`` (the loss without the KL penalty). All-masked input gives loss 0 and metrics 0.
    """
    check_floats({"logprobs": logprobs, "old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs}, ndim=2)
    check_floats({"advantages": advantages}, ndim=(1, 2))
    if advantages.shape not in (logprobs.shape, logprobs.shape[:1]):
        raise ValueError(f"advantages must be [B, T]={tuple(logprobs.shape)} or [B]=({logprobs.shape[0]},), "
                         f"got shape {tuple(advantages.shape)}")
    check_mask(mask, logprobs, like_name="logprobs")
    check_nonnegative("clip_eps", clip_eps)
    if clip_eps_high is not None:
        check_nonnegative("clip_eps_high", clip_eps_high)
    if dual_clip is not None:
        check_positive("dual_clip", dual_clip)
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (the dual-clip constant c), got {dual_clip!r}")
    check_choice("loss_agg", loss_agg, LOSS_AGG_MODES)
    check_nonnegative("kl_coef", kl_coef)
    check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError(f"ref_logprobs is required when kl_coef > 0 (got kl_coef={kl_coef!r} and ref_logprobs=None)")

    dtype = compute_dtype(logprobs, old_logprobs, ref_logprobs, advantages)
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    opts = TokenLossOptions(ratio_low=1.0 - clip_eps, ratio_high=1.0 + eps_high, dual_clip=dual_clip,
                            log_ratio_clamp=LOG_RATIO_CLAMP, kl_estimator=kl_estimator, kl_coef=float(kl_coef),
                            backend=resolve_backend(backend, logprobs.device))
    terms = pg_token_terms(logprobs.to(dtype), old_logprobs.to(dtype),
                           None if ref_logprobs is None else ref_logprobs.to(dtype), advantages.to(dtype), mask, opts)
    m = mask.to(dtype)
    loss = aggregate(terms.loss, m, loss_agg)
    metrics = {}
    with torch.no_grad():
        if dual_clip is not None:
            metrics["dual_clipfrac"] = terms.flag_mean(DUAL_CLIPPED, m)
        metrics["clipfrac"] = terms.flag_mean(CLIPPED, m)
        metrics["approx_kl"] = masked_mean(terms.approx_kl, m)
        metrics["ratio_mean"] = masked_mean(terms.ratio, m)
        if terms.kl is not None:
            metrics["kl"] = masked_mean(terms.kl, m)
            metrics["policy_loss"] = aggregate(terms.loss.detach() - kl_coef * terms.kl, m, loss_agg)
    return loss, metrics


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
                   clip: float | None = 0.2, loss_agg: str = "token-mean"
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped value loss ½·max((V − R)², (V_old + clip(V − V_old, ±clip) − R)²), aggregated over valid tokens.

    Args:
        values: [B, T] current value predictions V (differentiable).
        old_values: [B, T] value predictions of the rollout V_old (constant).
        returns: [B, T] value targets R, e.g. from `gae` (constant).
        mask: [B, T] nonzero on the tokens that count.
        clip: the clip range of V around V_old; None disables clipping (plain ½(V − R)²).
        loss_agg: as in `ppo_policy_loss`; ``"token-mean"`` by default.

    Returns:
        (loss, {"vf_clipfrac"}): loss a 0-dim tensor; vf_clipfrac the detached masked token mean of
        the tokens where the clipped error is the larger one. All-masked input gives 0 and 0.
    """
    check_floats({"values": values, "old_values": old_values, "returns": returns}, ndim=2)
    check_mask(mask, values, like_name="values")
    if clip is not None:
        check_nonnegative("clip", clip)
    check_choice("loss_agg", loss_agg, LOSS_AGG_MODES)
    dtype = compute_dtype(values, old_values, returns)
    m = mask.to(dtype)
    v, target = values.to(dtype), returns.detach().to(dtype)
    err = (v - target).square()
    if clip is None:
        per_token, clipped_more = err, torch.zeros_like(err)
    else:
        v_old = old_values.detach().to(dtype)
        err_clipped = (v_old + (v - v_old).clamp(-clip, clip) - target).square()
        per_token, clipped_more = torch.maximum(err, err_clipped), (err_clipped > err).to(dtype)
    loss = 0.5 * aggregate(per_token, m, loss_agg)
    return loss, {"vf_clipfrac": masked_mean(clipped_more, m).detach()}
