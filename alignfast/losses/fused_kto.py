"""`LinearKTOLoss`: KTO on unpaired desirable / undesirable completions, from hidden states.

Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic Optimization", ICML 2024,
https://arxiv.org/abs/2402.01306 (as TRL's KTOTrainer): with u = log π(y|x) − log π_ref(y|x)
(sums over the completion tokens) and the detached reference point z₀ = KL estimate,

    loss = mean_b  λ_D·(1 − σ(β·(u_b − z₀)))   (desirable)   |   λ_U·(1 − σ(β·(z₀ − u_b)))   (undesirable)

Each example's loss depends on its own sequence (z₀ is a constant), so chunks of whole sequences
give exact gradients in the pass that computes the log-probs: 3 vocab projections for the policy.
z₀ is given (`kl`) or estimated from TRL's mismatched-pair batch (`kl_hidden`, `kl_labels`): one
more no-grad projection per model, `kto_kl_estimate`.
"""
from __future__ import annotations

import torch

from alignfast.losses._validation import check_binary, check_choice
from alignfast.losses.fused_base import LinearLossBase, SequenceBatch, check_batch
from alignfast.losses.kto import KTO_LOSS_TYPES, kto_kl_estimate, kto_loss


class LinearKTOLoss(LinearLossBase):
    """KTO from hidden states. Options mirror `kto_loss` (beta, desirable_weight, undesirable_weight, loss_type).

    forward(hidden [B, T, H], weight [V, H], labels [B, T], desirable [B] bool, bias=None, *,
            ref_hidden + ref_weight (+ ref_bias) or ref_logps [B] / [B, T],
            kl: float | 0-dim tensor | None, or kl_hidden [B', T', H] + kl_labels [B', T'] with
            ref_kl_hidden (through ref_weight / ref_bias) or ref_kl_logps [B'])
        -> (loss, metrics): loss the mean over the B examples; metrics as TRL logs them: kl,
           rewards/chosen, logps/chosen (desirable means), rewards/rejected, logps/rejected
           (undesirable means), rewards/margins (each only when its subset is non-empty).
    """

    def __init__(self, *, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 loss_type: str = "kto", **options):
        super().__init__(**options)
        check_choice("loss_type", loss_type, KTO_LOSS_TYPES)
        self.beta, self.loss_type = beta, loss_type
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight

    def reference_point(self, weight, bias, kl, kl_hidden, kl_labels, ref_kl_hidden, ref_weight, ref_bias,
                        ref_kl_logps):
        """z₀: `kl` as given, or `kto_kl_estimate` on the mismatched pairs (no gradient)."""
        if kl is not None or self.loss_type != "kto":
            return kl
        if kl_hidden is None or kl_labels is None:
            raise ValueError("loss_type='kto' needs the reference point: pass kl, or kl_hidden + kl_labels "
                             "(with ref_kl_hidden or ref_kl_logps)")
        policy = self.token_logps_no_grad(kl_hidden, weight, bias, kl_labels, names=("kl_hidden", "kl_labels")).sum(-1)
        if ref_kl_logps is None:
            if ref_kl_hidden is None or ref_weight is None:
                raise ValueError("pass ref_kl_hidden (with ref_weight) or ref_kl_logps for the KL estimate")
            ref_kl_logps = self.token_logps_no_grad(ref_kl_hidden, ref_weight, ref_bias, kl_labels,
                                                    names=("ref_kl_hidden", "kl_labels")).sum(-1)
        return kto_kl_estimate(policy, ref_kl_logps)

    def forward(self, hidden, weight, labels, desirable, bias=None, *, ref_hidden=None, ref_weight=None,
                ref_bias=None, ref_logps=None, kl=None, kl_hidden=None, kl_labels=None, ref_kl_hidden=None,
                ref_kl_logps=None):
        check_batch(hidden, labels, self.unit)
        if ref_hidden is None and ref_weight is None and ref_logps is None:
            raise ValueError("LinearKTOLoss needs the reference: pass ref_hidden + ref_weight, or ref_logps")
        check_binary("desirable", desirable)
        if desirable.shape != labels.shape[:1]:
            raise ValueError(f"desirable must be a [B]=({labels.shape[0]},) bool tensor, got "
                             f"{getattr(desirable, 'shape', desirable)!r}")
        z0 = self.reference_point(weight, bias, kl, kl_hidden, kl_labels, ref_kl_hidden, ref_weight, ref_bias,
                                  ref_kl_logps)
        n_rows = labels.shape[0]

        def formula(batch: SequenceBatch):
            logps, ref, want = batch.seq_logps(), batch.ref_seq_logps(), batch.take(desirable).bool()
            losses, chosen_rewards, rejected_rewards = kto_loss(
                logps, ref, want, z0, beta=self.beta, desirable_weight=self.desirable_weight,
                undesirable_weight=self.undesirable_weight, loss_type=self.loss_type)
            metrics = {}
            if z0 is not None:
                metrics["kl"] = torch.as_tensor(z0, dtype=losses.dtype).detach().reshape(())
            if chosen_rewards.numel():
                metrics["rewards/chosen"] = chosen_rewards.mean()
                metrics["logps/chosen"] = logps[want].detach().mean()
            if rejected_rewards.numel():
                metrics["rewards/rejected"] = rejected_rewards.mean()
                metrics["logps/rejected"] = logps[~want].detach().mean()
            if chosen_rewards.numel() and rejected_rewards.numel():
                metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
            return losses.sum() / max(n_rows, 1), metrics

        return self._loss(formula, hidden, weight, bias, labels, ref_hidden=ref_hidden, ref_weight=ref_weight,
                          ref_bias=ref_bias, ref_logps=ref_logps)
