"""Fused preference losses: DPO and its reference-free cousins from hidden states.

The batch is TRL's concatenated forward: `hidden` [2P, T, H] holds the P chosen completions, then
the P rejected ones (pair i = rows i and P + i), `labels` [2P, T] their targets with
`ignore_index` on prompts and padding. `LinearPreferenceLoss` turns the policy's (and the
reference's) token log-probs into per-sequence log-probs and calls one functional loss; the
chunks of the fused pass hold whole pairs, so each pair's loss, and its gradient, is known in the
pass that computes its log-probs (3 vocab projections; the reference 1, without gradient).

Each subclass supplies only `pair_terms`: its formula on one batch of whole pairs.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from alignfast.losses._validation import check_choice
from alignfast.losses.dpo import DPO_LOSSES, dpo_loss
from alignfast.losses.fused_base import LinearLossBase, SequenceBatch

# DPO loss types that couple the pairs of a batch (sorting, a batch-mean shift): their gradient is
# not known chunk by chunk, so they take the 4-projection path.
BATCH_COUPLED_DPO_LOSSES = ("aot", "aot_unpaired", "bco_pair")


class PairTerms(NamedTuple):
    """A preference formula's output for some pairs (each [p]) plus an already-normalised extra."""

    losses: torch.Tensor            # per-pair losses, averaged over the batch's P pairs by the base
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor      # the sequence log-probs the method uses (summed or averaged)
    rejected_logps: torch.Tensor
    extra_loss: torch.Tensor | float = 0.0  # e.g. ORPO/CPO's NLL term, normalised over the whole batch
    extra_metrics: dict | None = None


class LinearPreferenceLoss(LinearLossBase):
    """Base of the fused preference losses: pairs in, `(loss, metrics)` out.

    forward(hidden [2P, T, H], weight [V, H], labels [2P, T], bias [V] | None, *,
            ref_hidden [2P, T, H] + ref_weight [V, H] (+ ref_bias), or ref_logps [2P] (per sequence,
            chosen first) or [2P, T] (per token))
        -> (loss, metrics): loss = mean over pairs of the per-pair losses (+ the method's extra term);
           metrics as TRL logs them: rewards/chosen, rewards/rejected, rewards/accuracies,
           rewards/margins, logps/chosen, logps/rejected (means over pairs, detached), plus the method's.
    """

    unit = "pair"
    needs_reference = False

    def pair_terms(self, batch: SequenceBatch, chosen_tokens: int) -> PairTerms:  # pragma: no cover
        raise NotImplementedError

    def separable(self) -> bool:
        """Whether each pair's loss depends on that pair only (then chunks of pairs give exact gradients)."""
        return True

    def forward(self, hidden, weight, labels, bias=None, *, ref_hidden=None, ref_weight=None, ref_bias=None,
                ref_logps=None):
        if self.needs_reference and ref_hidden is None and ref_weight is None and ref_logps is None:
            raise ValueError(f"{type(self).__name__} needs the reference: pass ref_hidden + ref_weight, or ref_logps")
        n_pairs = labels.shape[0] // 2
        chosen_tokens = int((labels[:n_pairs] != self.ignore_index).sum())  # the NLL terms' global normaliser

        def formula(batch: SequenceBatch):
            t = self.pair_terms(batch, chosen_tokens)
            loss = t.losses.sum() / max(n_pairs, 1) + t.extra_loss
            with torch.no_grad():
                metrics = {
                    "rewards/chosen": t.chosen_rewards.mean(),
                    "rewards/rejected": t.rejected_rewards.mean(),
                    "rewards/accuracies": (t.chosen_rewards > t.rejected_rewards).to(t.losses.dtype).mean(),
                    "rewards/margins": (t.chosen_rewards - t.rejected_rewards).mean(),
                    "logps/chosen": t.chosen_logps.mean(),
                    "logps/rejected": t.rejected_logps.mean(),
                }
                metrics.update(t.extra_metrics or {})
            return loss, metrics

        return self._loss(formula, hidden, weight, bias, labels, ref_hidden=ref_hidden, ref_weight=ref_weight,
                          ref_bias=ref_bias, ref_logps=ref_logps, separable=self.separable())


class LinearDPOLoss(LinearPreferenceLoss):
    """DPO and its variants (every `dpo_loss` loss type) from hidden states.

    Rafailov et al., "Direct Preference Optimization", NeurIPS 2023, https://arxiv.org/abs/2305.18290:
        loss = mean_pairs  ℓ(β·(u_c − u_r)),   u = log π(y|x) − log π_ref(y|x) (sums over completion tokens),
    ℓ = −log σ for the default "sigmoid"; see `alignfast.losses.dpo` for the others. Options mirror
    `dpo_loss` (beta, loss_type, label_smoothing, f_divergence, f_alpha_divergence_coef,
    discopop_tau, bco_running_mean); the lengths of ipo / sigmoid_norm are the completions' token
    counts. aot, aot_unpaired and bco_pair couple the pairs of a batch and take the 4-projection path.

    Example:
        >>> loss_fn = LinearDPOLoss(beta=0.1)
        >>> loss, metrics = loss_fn(hidden, lm_head.weight, labels, ref_hidden=ref_hidden, ref_weight=ref_w)
    """

    needs_reference = True

    def __init__(self, *, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 f_divergence: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5, discopop_tau: float = 0.05,
                 bco_running_mean: float | None = None, **options):
        super().__init__(**options)
        check_choice("loss_type", loss_type, DPO_LOSSES)
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.f_divergence, self.f_alpha_divergence_coef = f_divergence, f_alpha_divergence_coef
        self.discopop_tau, self.bco_running_mean = discopop_tau, bco_running_mean

    def separable(self) -> bool:
        return self.loss_type not in BATCH_COUPLED_DPO_LOSSES

    def pair_terms(self, batch: SequenceBatch, chosen_tokens: int) -> PairTerms:
        chosen, rejected = batch.halves(batch.seq_logps())
        ref_chosen, ref_rejected = batch.halves(batch.ref_seq_logps())
        chosen_len, rejected_len = batch.halves(batch.lengths())
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, beta=self.beta, loss_type=self.loss_type,
            label_smoothing=self.label_smoothing, f_divergence=self.f_divergence,
            f_alpha_divergence_coef=self.f_alpha_divergence_coef, chosen_lengths=chosen_len,
            rejected_lengths=rejected_len, discopop_tau=self.discopop_tau, bco_running_mean=self.bco_running_mean)
        return PairTerms(losses, chosen_rewards, rejected_rewards, chosen.detach(), rejected.detach())
