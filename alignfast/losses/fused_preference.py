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

from collections.abc import Sequence
from typing import NamedTuple

import torch

from alignfast.losses._reductions import batch_mean
from alignfast.losses._validation import check_choice, check_finite
from alignfast.losses.dpo import DPO_LOSSES, dpo_loss
from alignfast.losses.fused_base import LinearLossBase, SequenceBatch, check_batch
from alignfast.losses.preference import CPO_LOSS_TYPES, _reward_metrics, cpo_loss, orpo_loss, simpo_loss

# DPO loss types that couple the pairs of a batch (sorting, a batch-mean shift): their gradient is
# not known chunk by chunk, so they take the 4-projection path.
BATCH_COUPLED_DPO_LOSSES = ("aot", "aot_unpaired", "bco_pair")


class PairTerms(NamedTuple):
    """A preference formula's output for some pairs."""

    losses: torch.Tensor         # [p] per-pair losses; the base averages them over the batch's P pairs
    metrics: dict                # the functional loss's metrics (rewards/*, ...) for these pairs
    chosen_logps: torch.Tensor   # [p] the sequence log-probs the method uses (summed or averaged)
    rejected_logps: torch.Tensor


class LinearPreferenceLoss(LinearLossBase):
    """Base of the fused preference losses: pairs in, `(loss, metrics)` out.

    forward(hidden [2P, T, H], weight [V, H], labels [2P, T], bias [V] | None, *,
            ref_hidden [2P, T, H] + ref_weight [V, H] (+ ref_bias), or ref_logps [2P] (per sequence,
            chosen first) or [2P, T] (per token); the reference-free losses refuse one)
        -> (loss, metrics): loss = mean over pairs of the per-pair losses (NLL terms included);
           metrics as TRL logs them: rewards/chosen, rewards/rejected, rewards/accuracies,
           rewards/margins, logps/chosen, logps/rejected (means over pairs, detached), plus the method's.
    """

    unit = "pair"
    needs_reference = False

    def pair_terms(self, batch: SequenceBatch, chosen_tokens: int) -> PairTerms:  # pragma: no cover
        """The method's formula on the whole pairs of `batch`; `chosen_tokens` is the number of
        chosen completion tokens in the whole batch (the NLL terms' normaliser)."""
        raise NotImplementedError

    @staticmethod
    def chosen_nll(batch: SequenceBatch, chosen_tokens: int) -> torch.Tensor:
        """The chosen completions' token-mean NLL over the whole batch, as these pairs' share of it,
        scaled so that the functional loss's per-pair mean gives that share back:
        NLL_part · P/p (a 0-dim tensor). On the whole batch: TRL's chosen NLL."""
        chosen, _ = batch.halves(batch.logps)
        pairs = chosen.shape[0]
        return -chosen.sum() / max(chosen_tokens, 1) * (batch.total_rows // 2) / max(pairs, 1)

    @staticmethod
    def averaged(batch: SequenceBatch) -> torch.Tensor:
        """[b] length-averaged sequence log-probs (0 for an empty completion)."""
        return batch.seq_logps() / batch.lengths().clamp(min=1)

    def separable(self) -> bool:
        """Whether each pair's loss depends on that pair only (then chunks of pairs give exact gradients)."""
        return True

    def forward(self, hidden, weight, labels, bias=None, *, ref_hidden=None, ref_weight=None, ref_bias=None,
                ref_logps=None):
        check_batch(hidden, labels, self.unit)
        given = not (ref_hidden is None and ref_weight is None and ref_bias is None and ref_logps is None)
        if self.needs_reference and not given:
            raise ValueError(f"{type(self).__name__} needs the reference: pass ref_hidden + ref_weight, or ref_logps")
        if given and not self.needs_reference:  # its log-probs would cost a vocab projection, then go unused
            raise ValueError(f"{type(self).__name__} is reference-free: drop ref_hidden, ref_weight, ref_bias and "
                             "ref_logps")
        n_pairs = labels.shape[0] // 2
        chosen_tokens = int((labels[:n_pairs] != self.ignore_index).sum())  # the NLL terms' global normaliser

        def formula(batch: SequenceBatch):
            t = self.pair_terms(batch, chosen_tokens)
            loss = t.losses.sum() / max(n_pairs, 1)
            metrics = dict(t.metrics)
            metrics["logps/chosen"] = batch_mean(t.chosen_logps.detach())
            metrics["logps/rejected"] = batch_mean(t.rejected_logps.detach())
            return loss, metrics

        return self._loss(formula, hidden, weight, bias, labels, ref_hidden=ref_hidden, ref_weight=ref_weight,
                          ref_bias=ref_bias, ref_logps=ref_logps, separable=self.separable())


class LinearDPOLoss(LinearPreferenceLoss):
    """DPO and its variants (every `dpo_loss` loss type, or a weighted sum of several) from hidden states.

    Rafailov et al., "Direct Preference Optimization", NeurIPS 2023, https://arxiv.org/abs/2305.18290:
        loss = mean_pairs  ℓ(β·(u_c − u_r)),   u = log π(y|x) − log π_ref(y|x) (sums over completion tokens),
    ℓ = −log σ for the default "sigmoid"; see `alignfast.losses.dpo` for the others. Options mirror
    `dpo_loss` (beta, loss_type, label_smoothing, f_divergence, f_alpha_divergence_coef,
    discopop_tau, bco_running_mean); the lengths of ipo / sigmoid_norm are the completions' token
    counts. aot, aot_unpaired and bco_pair couple the pairs of a batch and take the 4-projection path.

    As TRL 1.16's `DPOConfig`, `loss_type` may be a list with `loss_weights` (default 1 each): the loss is
    Σ_k w_k·loss_k, and "sft" is a type there too, the chosen completions' token-mean NLL (RPO's term; MPO
    is ["sigmoid", "bco_pair", "sft"]). The reward metrics are the first preference type's.

    Example:
        >>> loss_fn = LinearDPOLoss(beta=0.1)
        >>> loss, metrics = loss_fn(hidden, lm_head.weight, labels, ref_hidden=ref_hidden, ref_weight=ref_w)
    """

    needs_reference = True

    def __init__(self, *, beta: float = 0.1, loss_type: str | Sequence[str] = "sigmoid",
                 loss_weights: Sequence[float] | None = None, label_smoothing: float = 0.0,
                 f_divergence: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5, discopop_tau: float = 0.05,
                 bco_running_mean: float | None = None, **options):
        super().__init__(**options)
        self.loss_types, self.loss_weights = check_loss_types(loss_type, loss_weights)
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.f_divergence, self.f_alpha_divergence_coef = f_divergence, f_alpha_divergence_coef
        self.discopop_tau, self.bco_running_mean = discopop_tau, bco_running_mean

    def separable(self) -> bool:
        return not set(self.loss_types) & set(BATCH_COUPLED_DPO_LOSSES)

    def pair_terms(self, batch: SequenceBatch, chosen_tokens: int) -> PairTerms:
        chosen, rejected = batch.halves(batch.seq_logps())
        ref_chosen, ref_rejected = batch.halves(batch.ref_seq_logps())
        chosen_len, rejected_len = batch.halves(batch.lengths())

        def dpo(loss_type):
            return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=self.beta, loss_type=loss_type,
                            label_smoothing=self.label_smoothing, f_divergence=self.f_divergence,
                            f_alpha_divergence_coef=self.f_alpha_divergence_coef, chosen_lengths=chosen_len,
                            rejected_lengths=rejected_len, discopop_tau=self.discopop_tau,
                            bco_running_mean=self.bco_running_mean)

        losses, rewards = 0, None
        for loss_type, weight in zip(self.loss_types, self.loss_weights):
            if loss_type == "sft":  # these pairs' share of the batch's chosen token-mean NLL, per pair
                term = self.chosen_nll(batch, chosen_tokens).expand(chosen.shape[0])
            else:
                term, *pair_rewards = dpo(loss_type)
                rewards = rewards or pair_rewards
            losses = losses + weight * term
        if rewards is None:  # "sft" alone: the rewards are still β·(log-ratio)s
            rewards = dpo("sigmoid")[1:]
        return PairTerms(losses, _reward_metrics(*rewards), chosen, rejected)


def check_loss_types(loss_type, loss_weights) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """(types, weights) of a DPO `loss_type` (a name or a list of them, "sft" among them) and its weights."""
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not types:
        raise ValueError("loss_type: give at least one DPO loss type")
    for t in types:
        check_choice("loss_type", t, (*DPO_LOSSES, "sft"))
    weights = (1.0,) * len(types) if loss_weights is None else tuple(loss_weights)
    if len(weights) != len(types):
        raise ValueError(f"loss_weights has {len(weights)} entries for {len(types)} loss types {list(types)}")
    for w in weights:
        check_finite("loss_weights", w)
    return types, tuple(float(w) for w in weights)


class LinearSimPOLoss(LinearPreferenceLoss):
    """SimPO from hidden states: no reference, length-averaged log-probs, a target margin γ.

    Meng, Xia and Chen, "SimPO", NeurIPS 2024, https://arxiv.org/abs/2405.14734, Eq. 6:
        loss = mean_pairs −log σ(β·avg log π(y_c|x) − β·avg log π(y_r|x) − γ)
    Options mirror `simpo_loss` (beta, gamma, label_smoothing). For TRL's CPO-SimPO (with the
    chosen NLL) use `LinearCPOLoss(loss_type="simpo")`.
    """

    def __init__(self, *, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0, **options):
        super().__init__(**options)
        self.beta, self.gamma, self.label_smoothing = beta, gamma, label_smoothing

    def pair_terms(self, batch: SequenceBatch, chosen_tokens: int) -> PairTerms:
        chosen, rejected = batch.halves(self.averaged(batch))
        losses, metrics = simpo_loss(chosen, rejected, beta=self.beta, gamma=self.gamma,
                                     label_smoothing=self.label_smoothing)
        return PairTerms(losses, metrics, chosen, rejected)


class LinearORPOLoss(LinearPreferenceLoss):
    """ORPO from hidden states: the chosen NLL plus β times the log odds-ratio loss, no reference.

    Hong, Lee and Thorne, "ORPO", EMNLP 2024, https://arxiv.org/abs/2403.07691, Eqs. 4-7:
        loss = NLL_c − β·mean_pairs log σ(log odds(y_c) − log odds(y_r)),  odds = P/(1 − P),
    P = exp(length-averaged log-prob). NLL_c is the token mean over the chosen completions' targets
    (`labels`); TRL's ORPOTrainer also counts the prompt tokens in it (not supported here: their
    log-probs would cost projections the odds ratio does not need). Options: beta (`orpo_loss`).
    Metrics: rewards/*, logps/* (averaged), log_odds_ratio, log_odds_chosen, nll_loss.
    """

    def __init__(self, *, beta: float = 0.1, **options):
        super().__init__(**options)
        self.beta = beta

    def pair_terms(self, batch: SequenceBatch, chosen_tokens: int) -> PairTerms:
        chosen, rejected = batch.halves(self.averaged(batch))
        losses, metrics = orpo_loss(chosen, rejected, self.chosen_nll(batch, chosen_tokens), beta=self.beta)
        return PairTerms(losses, metrics, chosen, rejected)


class LinearCPOLoss(LinearPreferenceLoss):
    """CPO from hidden states: a reference-free DPO-style term plus cpo_alpha times the chosen NLL.

    Xu et al., "Contrastive Preference Optimization", ICML 2024, https://arxiv.org/abs/2401.08417, Eq. 3
    (TRL's CPOTrainer): loss = mean_pairs ℓ(β·(log π(y_c) − log π(y_r))) + cpo_alpha·NLL_c, with
    summed log-probs for sigmoid / hinge and length-averaged ones for ipo / simpo (as TRL), NLL_c
    the token mean over the chosen completions. Options mirror `cpo_loss` (beta, label_smoothing,
    loss_type, simpo_gamma, cpo_alpha, alpha).
    """

    def __init__(self, *, beta: float = 0.1, label_smoothing: float = 0.0, loss_type: str = "sigmoid",
                 simpo_gamma: float = 0.5, cpo_alpha: float = 1.0, alpha: float = 0.0, **options):
        super().__init__(**options)
        check_choice("loss_type", loss_type, CPO_LOSS_TYPES)
        self.beta, self.label_smoothing, self.loss_type = beta, label_smoothing, loss_type
        self.simpo_gamma, self.cpo_alpha, self.alpha = simpo_gamma, cpo_alpha, alpha

    def pair_terms(self, batch: SequenceBatch, chosen_tokens: int) -> PairTerms:
        logps = self.averaged(batch) if self.loss_type in ("ipo", "simpo") else batch.seq_logps()
        chosen, rejected = batch.halves(logps)
        nll = self.chosen_nll(batch, chosen_tokens) if self.cpo_alpha else None
        losses, metrics = cpo_loss(chosen, rejected, nll, beta=self.beta, label_smoothing=self.label_smoothing,
                                   loss_type=self.loss_type, simpo_gamma=self.simpo_gamma,
                                   cpo_alpha=self.cpo_alpha, alpha=self.alpha)
        return PairTerms(losses, metrics, chosen, rejected)
