"""Fused policy-gradient losses: PPO and GRPO from hidden states.

`hidden` [B, T, H] are the policy's last hidden states over prompt + completion, `labels` [B, T]
the sampled completion tokens (already shifted, `ignore_index` on the prompt and padding). The
policy's token log-probs (and entropies) are streamed chunk by chunk of whole sequences; the
functional loss on a chunk, rescaled by the chunk's share of the batch's normaliser, gives the
per-token gradient in the same pass (3 vocab projections); the reference costs 1, no gradient.
The per-token arithmetic is `ppo_policy_loss` / `grpo_loss`, i.e. the fused token pass of
`alignfast.losses.pg_token` (`token_backend` picks its backend).
"""
from __future__ import annotations

import torch

from alignfast.losses._reductions import LOSS_AGG_MODES, aggregate, masked_mean
from alignfast.losses._validation import check_choice, check_finite, check_nonnegative, check_positive, check_rows
from alignfast.losses.fused_base import LinearLossBase, SequenceBatch, check_batch
from alignfast.losses.grpo import (GRPO_LOSS_TYPES, IMPORTANCE_SAMPLING_LEVELS, TOKEN_SUM_LOSS_TYPES, check_delta,
                                   grpo_loss)
from alignfast.losses.kl import KL_ESTIMATORS
from alignfast.losses.pg_token import PG_TOKEN_BACKENDS
from alignfast.losses.ppo import ppo_policy_loss
from alignfast.ops.kl import FusedKLPenalty, kl_backends, make_kl_options, weighted_kl_sum


class LinearPPOLoss(LinearLossBase):
    """PPO's clipped policy loss + a per-token KL penalty to the reference − an entropy bonus.

    Schulman et al., "Proximal Policy Optimization Algorithms", 2017, https://arxiv.org/abs/1707.06347;
    the KL penalty as in Ouyang et al. (InstructGPT), 2022, https://arxiv.org/abs/2203.02155:

        loss = agg(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε_high))) + kl_coef·agg(KL_t) − entropy_coef·agg(H_t)

    ρ = π/π_old per token, KL_t = `token_kl(logp, ref, kl_estimator)` for kl_estimator k1/k2/k3,
    H_t the policy's entropy, agg the `loss_agg` reduction for all three terms. Options mirror
    `ppo_policy_loss` (clip_eps, clip_eps_high, dual_clip, loss_agg) plus kl_coef, kl_estimator,
    entropy_coef, token_backend (the token pass's backend); `log_entropy` computes the entropy for
    the metric even when entropy_coef is 0 (one more pass per block).

    kl_estimator="full": KL_t is the exact KL(π‖π_ref) over the whole vocabulary, from hidden/weight
    and ref_hidden/ref_weight (no logits; differentiable w.r.t. the policy side). With a gradient on the
    native backends (`cpp`, `cuda`) it rides along the policy's fused pass (`ops.kl.FusedKLPenalty`):
    each chunk's reference block beside the policy's, 4 vocab projections in all (5 for the rows of a
    sequence past its first chunk with a per-sequence `loss_agg`), chunks of half as many rows when
    `chunk_size` is not given; elsewhere (and with `grad_filter_eps`) a separate `linear_kl` pass. It
    needs ref_hidden + ref_weight (ref_logps only hold the sampled tokens) and no softcap.

    forward(hidden [B, T, H], weight [V, H], labels [B, T], old_logprobs [B, T], advantages [B, T] or [B],
            bias=None, *, ref_hidden + ref_weight (+ ref_bias) or ref_logps [B, T])
        -> (loss, {"policy_loss", "clipfrac", "approx_kl", "ratio_mean", "kl"?, "entropy"?, ...}),
           metrics masked token means over the batch, detached.
    """

    def __init__(self, *, clip_eps: float = 0.2, clip_eps_high: float | None = None, dual_clip: float | None = None,
                 loss_agg: str = "token-mean", kl_coef: float = 0.0, kl_estimator: str = "k1",
                 entropy_coef: float = 0.0, log_entropy: bool = True, token_backend: str = "auto", **options):
        super().__init__(**options)
        check_choice("loss_agg", loss_agg, LOSS_AGG_MODES)
        check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS + ("full",))
        check_choice("token_backend", token_backend, PG_TOKEN_BACKENDS)
        check_nonnegative("kl_coef", kl_coef)
        check_finite("entropy_coef", entropy_coef)
        if kl_estimator == "full" and self.softcap is not None:
            raise ValueError(f"kl_estimator='full' (linear_kl) does not support a logit softcap (got softcap="
                             f"{self.softcap!r}); use kl_estimator 'k1', 'k2' or 'k3'")
        self.clip_eps, self.clip_eps_high, self.dual_clip, self.loss_agg = clip_eps, clip_eps_high, dual_clip, loss_agg
        self.kl_coef, self.kl_estimator = kl_coef, kl_estimator
        self.entropy_coef, self.log_entropy, self.token_backend = entropy_coef, log_entropy, token_backend

    def forward(self, hidden, weight, labels, old_logprobs, advantages, bias=None, *, ref_hidden=None,
                ref_weight=None, ref_bias=None, ref_logps=None):
        check_batch(hidden, labels, self.unit)  # first: the per-row inputs are described by labels' shape
        check_rows("old_logprobs", old_logprobs, labels, per_row=False)
        check_rows("advantages", advantages, labels)
        full = self.kl_estimator == "full"
        if full:
            self._check_full_reference(ref_hidden, ref_weight, ref_logps)
        else:
            has_ref = ref_hidden is not None or ref_weight is not None or ref_logps is not None
            if self.kl_coef and not has_ref:
                raise ValueError(f"kl_coef={self.kl_coef!r} needs the reference: pass ref_hidden + ref_weight or "
                                 "ref_logps")

        def formula(batch: SequenceBatch):
            mask = batch.mask
            ref = batch.ref_token_logps() if batch.ref is not None else None
            loss, metrics = ppo_policy_loss(batch.logps, batch.take(old_logprobs), batch.take(advantages), mask,
                                            clip_eps=self.clip_eps, clip_eps_high=self.clip_eps_high,
                                            dual_clip=self.dual_clip, loss_agg=self.loss_agg, ref_logprobs=ref,
                                            kl_coef=self.kl_coef if ref is not None else 0.0,
                                            kl_estimator="k1" if full else self.kl_estimator,
                                            backend=self.token_backend)
            metrics.setdefault("policy_loss", loss.detach())
            if batch.entropy is not None:
                if self.entropy_coef:
                    loss = loss - self.entropy_coef * aggregate(batch.entropy, mask, self.loss_agg)
                metrics["entropy"] = masked_mean(batch.entropy, mask).detach()
            share = batch.token_share if self.loss_agg == "token-mean" else batch.row_share
            return loss * share, metrics

        # "full" takes the reference from linear_kl, not as sampled-token log-probs: riding along the
        # policy's fused pass where the backend can carry it (4 vocab projections), else on its own (7).
        refs = {} if full else dict(ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias,
                                    ref_logps=ref_logps)
        penalty = self._full_kl_term(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias) \
            if full and ref_hidden is not None else None
        loss, metrics = self._loss(formula, hidden, weight, bias, labels, ref_per_token=True,
                                   with_entropy=self.log_entropy or bool(self.entropy_coef),
                                   token_sum=self.loss_agg == "token-mean", extra=penalty, **refs)
        if penalty is not None:
            valid = labels != self.ignore_index
            if penalty.index is not None:  # carried: its value is in the loss already
                kl = penalty.per_row(labels.numel()).view(labels.shape)
            else:
                value, kl = self._full_kl(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, penalty)
                if self.kl_coef:
                    loss = loss + value
            metrics["kl"] = masked_mean(kl, valid.to(kl.dtype)).detach()
        return loss, metrics

    def _check_full_reference(self, ref_hidden, ref_weight, ref_logps) -> None:
        if ref_logps is not None:
            raise ValueError("kl_estimator='full' needs ref_hidden and ref_weight (the reference's hidden states and "
                             "output head); ref_logps only hold the sampled tokens' log-probs")
        if (ref_hidden is None) != (ref_weight is None) or (self.kl_coef and ref_hidden is None):
            raise ValueError(f"kl_estimator='full' with kl_coef={self.kl_coef!r} needs both ref_hidden and ref_weight "
                             f"(got ref_hidden={'a tensor' if ref_hidden is not None else None}, "
                             f"ref_weight={'a tensor' if ref_weight is not None else None})")

    def _full_kl_term(self, hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias) -> FusedKLPenalty:
        """kl_coef·aggregate(KL(π‖π_ref)) as per-token weights on the flat rows (the aggregate is linear in
        the KL, so they are known up front), for the policy's fused pass to carry (`FusedKLPenalty`)."""
        valid = labels != self.ignore_index
        backend = self.backend if self.backend in kl_backends() else "auto"
        opts = make_kl_options(hidden, weight, ref_hidden, ref_weight, bias, ref_bias, valid, reverse=False,
                               temperature=self.temperature, backend=backend, chunk_size=self.chunk_size)
        # ∂aggregate/∂KL: the weight of each token's KL in the loss (autograd on a probe, also under inference_mode)
        with torch.inference_mode(False), torch.enable_grad():
            probe = torch.zeros(labels.shape, dtype=torch.float64, device=labels.device, requires_grad=True)
            (weights,) = torch.autograd.grad(aggregate(probe, valid.to(torch.float64), self.loss_agg), probe)
        return FusedKLPenalty(ref_hidden.reshape(-1, ref_hidden.shape[-1]), ref_weight, ref_bias,
                              (self.kl_coef * weights).reshape(-1), opts)

    def _full_kl(self, hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, term: FusedKLPenalty):
        """The penalty on its own where the policy's pass could not carry it: (Σ w·KL, differentiable;
        the [B, T] KL, 0 at ignored positions). Native backends still form its gradient in the forward."""
        valid = (labels != self.ignore_index).reshape(-1)
        with torch.set_grad_enabled(torch.is_grad_enabled() and bool(self.kl_coef)):  # metric only: no graph
            value, kl = weighted_kl_sum(hidden.reshape(-1, hidden.shape[-1]), weight, bias, term.ref_hidden,
                                        term.ref_weight, term.ref_bias, valid, term.opts, term.token_weights)
        return value, kl.view(labels.shape)


class LinearGRPOLoss(LinearLossBase):
    """GRPO and TRL's variants (BNPO, Dr. GRPO, DAPO, LUSPO, CISPO, SAPO; GSPO's sequence-level ratio,
    two-sided clipping) from hidden states, with TRL's normalisers.

    Shao et al., "DeepSeekMath" (GRPO), 2024, https://arxiv.org/abs/2402.03300:
        l_t = −min(ρ·A, clip(ρ, 1−ε, 1+ε_high)·A) + β·w·k3_t, normalised per `loss_type` (see `grpo_loss`).
    Options mirror `grpo_loss` (beta, epsilon, epsilon_high, loss_type, max_completion_length,
    importance_sampling_level, delta, use_bias_correction_kl, sapo_temperature_pos/neg) plus
    token_backend (the token pass's backend); `log_entropy` adds TRL's "entropy" metric (one more
    pass per block). Chunks hold whole completions, except for a token-level ρ with a token-sum
    normaliser (dapo, bnpo, cispo), whose chunks are token ranges.

    forward(hidden [B, T, H], weight [V, H], labels [B, T], advantages [B] (or [B, T]), bias=None, *,
            old_logprobs [B, T] | None (None: on-policy, π_old = π detached), ref_hidden + ref_weight
            (+ ref_bias) or ref_logps [B, T] (needed when beta > 0))
        -> (loss, {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "kl"?, "entropy"?}).
    """

    def __init__(self, *, beta: float = 0.0, epsilon: float = 0.2, epsilon_high: float | None = None,
                 loss_type: str = "dapo", max_completion_length: int | None = None,
                 importance_sampling_level: str = "token", delta: float | None = None,
                 use_bias_correction_kl: bool = True, sapo_temperature_pos: float = 1.0,
                 sapo_temperature_neg: float = 1.05, log_entropy: bool = True, token_backend: str = "auto", **options):
        super().__init__(**options)
        check_choice("loss_type", loss_type, GRPO_LOSS_TYPES)
        check_choice("importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
        check_choice("token_backend", token_backend, PG_TOKEN_BACKENDS)
        check_delta(delta, loss_type, epsilon if epsilon_high is None else epsilon_high)
        check_positive("sapo_temperature_pos", sapo_temperature_pos)
        check_positive("sapo_temperature_neg", sapo_temperature_neg)
        if max_completion_length is not None:
            check_positive("max_completion_length", max_completion_length)
        self.token_backend = token_backend
        self.beta, self.epsilon, self.epsilon_high = beta, epsilon, epsilon_high
        self.loss_type, self.max_completion_length, self.log_entropy = loss_type, max_completion_length, log_entropy
        self.importance_sampling_level, self.delta = importance_sampling_level, delta
        self.use_bias_correction_kl = use_bias_correction_kl
        self.sapo_temperature_pos, self.sapo_temperature_neg = sapo_temperature_pos, sapo_temperature_neg

    def forward(self, hidden, weight, labels, advantages, bias=None, *, old_logprobs=None, ref_hidden=None,
                ref_weight=None, ref_bias=None, ref_logps=None):
        check_batch(hidden, labels, self.unit)  # first: the per-row inputs are described by labels' shape
        check_rows("advantages", advantages, labels)
        if old_logprobs is not None:
            check_rows("old_logprobs", old_logprobs, labels, per_row=False)
        has_ref = ref_hidden is not None or ref_weight is not None or ref_logps is not None
        if self.beta and not has_ref:
            raise ValueError(f"beta={self.beta!r} needs the reference: pass ref_hidden + ref_weight or ref_logps")
        max_len = labels.shape[1] if self.max_completion_length is None else self.max_completion_length

        def formula(batch: SequenceBatch):
            ref = batch.ref_token_logps() if batch.ref is not None else None
            loss, metrics = grpo_loss(batch.logps, batch.take(old_logprobs), ref, batch.take(advantages), batch.mask,
                                      beta=self.beta, epsilon=self.epsilon, epsilon_high=self.epsilon_high,
                                      loss_type=self.loss_type, max_completion_length=max_len,
                                      importance_sampling_level=self.importance_sampling_level, delta=self.delta,
                                      use_bias_correction_kl=self.use_bias_correction_kl,
                                      sapo_temperature_pos=self.sapo_temperature_pos,
                                      sapo_temperature_neg=self.sapo_temperature_neg, backend=self.token_backend)
            if batch.entropy is not None:
                metrics["entropy"] = masked_mean(batch.entropy, batch.mask).detach()
            share = batch.token_share if self.loss_type in TOKEN_SUM_LOSS_TYPES else batch.row_share
            return loss * share, metrics

        # a sum over tokens needs no whole completions, unless ρ is the completion's (GSPO)
        token_sum = self.loss_type in TOKEN_SUM_LOSS_TYPES and self.importance_sampling_level == "token"
        return self._loss(formula, hidden, weight, bias, labels, ref_hidden=ref_hidden, ref_weight=ref_weight,
                          ref_bias=ref_bias, ref_logps=ref_logps, ref_per_token=True, with_entropy=self.log_entropy,
                          token_sum=token_sum)
