"""Offline preference optimisation: DPO (Rafailov et al., 2023) and its variants, SimPO, ORPO and CPO.

    method=dpo    loss = ℓ(β·[(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))])
                  ℓ = −log σ for loss_type=sigmoid; every `alignfast.losses.DPO_LOSSES` type, and the
                  f-divergences (reverse_kl, forward_kl, js_divergence, alpha_divergence) of Wang et al. 2023
    method=simpo  −log σ(β·avg log π(y_w|x) − β·avg log π(y_l|x) − γ)                    (no reference)
    method=orpo   NLL(y_w) − β·log σ(log odds(y_w) − log odds(y_l))                      (no reference)
    method=cpo    ℓ(β·(log π(y_w|x) − log π(y_l|x))) + α·NLL(y_w), loss_type sigmoid/hinge/ipo/simpo

Chosen and rejected run in one forward (rows [0, P) and [P, 2P) of the batch); the hidden states and
the full `lm_head` weight go to the fused `Linear*Loss` module of the method (3 vocab projections,
no logits). The loss is averaged over the pairs of the global batch. For ORPO/CPO the NLL term is the
token mean over each micro-batch's chosen completions (as TRL computes it per batch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from alignfast.data import PreferenceCollator
from alignfast.losses import DPO_LOSSES, LinearCPOLoss, LinearDPOLoss, LinearORPOLoss, LinearSimPOLoss
from alignfast.losses.dpo import F_DIVERGENCE_LOSS_TYPES, F_DIVERGENCES
from alignfast.losses.preference import CPO_LOSS_TYPES
from alignfast.trainers.base import Trainer
from alignfast.trainers.config import TrainConfig, _check_model_path, opt
from alignfast.trainers.modeling import full_head
from alignfast.trainers.reference import ReferencePolicy
from alignfast.trainers.sequence import shift

METHODS = ("dpo", "simpo", "orpo", "cpo")
REFERENCE_FREE = ("simpo", "orpo", "cpo")


def loss_types(method: str = "dpo") -> tuple[str, ...]:
    return tuple(CPO_LOSS_TYPES) if method == "cpo" else tuple(DPO_LOSSES)


@dataclass
class DPOConfig(TrainConfig):
    method: str = opt("dpo", "dpo, simpo, orpo or cpo (simpo/orpo/cpo use no reference model)")
    beta: float = opt(0.1, "β: DPO's KL strength; SimPO's reward scale (the paper uses ~2.0); ORPO's λ; CPO's β")
    loss_type: str = opt("sigmoid", "dpo: any DPO loss type (sigmoid, hinge, ipo, robust, apo_zero, ... as TRL); "
                                    "cpo: sigmoid, hinge, ipo or simpo")
    label_smoothing: float = opt(0.0, "cDPO / robust label noise ε, in [0, 0.5) (dpo, simpo, cpo)")
    f_divergence: str = opt("reverse_kl", "dpo: reverse_kl, forward_kl, js_divergence or alpha_divergence")
    f_alpha_divergence_coef: float = opt(0.5, "α of f_divergence=alpha_divergence")
    simpo_gamma: float = opt(0.5, "γ: target reward margin of SimPO (and of cpo with loss_type=simpo)")
    cpo_alpha: float = opt(1.0, "weight of the chosen NLL term of CPO")
    ref_model: str | None = opt(None, "reference model directory; default: a frozen copy of the initial policy")
    precompute_ref_logps: bool = opt(False, "compute reference log-probs once, then drop the reference model")
    disable_dropout: bool = opt(True, "set every dropout probability to 0 (TRL's default): the policy's "
                                      "log-probs are then comparable with the reference's, which runs in eval mode")
    learning_rate: float = opt(5e-7, "AdamW peak learning rate")

    stage = "dpo"
    data_kind = "preference"

    def validate(self):
        super().validate()
        if self.method not in METHODS:
            raise ValueError(f"method: {self.method!r} is unknown; choose one of {list(METHODS)}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta!r}")
        if self.loss_type not in loss_types(self.method):
            raise ValueError(f"loss_type: {self.loss_type!r} is unknown for method={self.method}; "
                             f"choose one of {list(loss_types(self.method))}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}")
        if self.method == "dpo" and self.loss_type == "exo_pair" and self.label_smoothing == 0:
            raise ValueError("label_smoothing must be > 0 for loss_type=exo_pair (the EXO paper uses 1e-3)")
        if self.f_divergence not in F_DIVERGENCES:
            raise ValueError(f"f_divergence: {self.f_divergence!r} is unknown; choose one of {list(F_DIVERGENCES)}")
        if self.f_divergence != "reverse_kl" and (self.method != "dpo" or self.loss_type not in F_DIVERGENCE_LOSS_TYPES):
            raise ValueError(f"f_divergence={self.f_divergence!r} needs method=dpo and loss_type in "
                             f"{sorted(F_DIVERGENCE_LOSS_TYPES)}")
        if self.cpo_alpha < 0:
            raise ValueError(f"cpo_alpha must be >= 0, got {self.cpo_alpha!r}")
        if self.method in REFERENCE_FREE and (self.ref_model or self.precompute_ref_logps):
            raise ValueError(f"ref_model / precompute_ref_logps: method={self.method} uses no reference model")
        if self.ref_model is not None:
            _check_model_path("ref_model", self.ref_model)
        return self


def build_preference_loss(cfg: DPOConfig, softcap: float | None):
    """The fused loss module of `cfg.method` (hidden states + lm_head weight in, (mean loss, metrics) out)."""
    common = dict(softcap=softcap, backend=cfg.backend, chunk_size=cfg.chunk_size)
    if cfg.method == "simpo":
        return LinearSimPOLoss(beta=cfg.beta, gamma=cfg.simpo_gamma, label_smoothing=cfg.label_smoothing, **common)
    if cfg.method == "orpo":
        return LinearORPOLoss(beta=cfg.beta, **common)
    if cfg.method == "cpo":
        return LinearCPOLoss(beta=cfg.beta, label_smoothing=cfg.label_smoothing, loss_type=cfg.loss_type,
                             simpo_gamma=cfg.simpo_gamma, cpo_alpha=cfg.cpo_alpha, **common)
    return LinearDPOLoss(beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                         f_divergence=cfg.f_divergence, f_alpha_divergence_coef=cfg.f_alpha_divergence_coef, **common)


class DPOTrainer(Trainer):
    config_class = DPOConfig
    data_kind = "preference"

    def build_collator(self):
        return PreferenceCollator(self.tokenizer.pad_token_id)

    def setup(self):
        self.loss_fn = build_preference_loss(self.cfg, self.model.head().softcap)
        self.reference = None
        if not self.loss_fn.needs_reference:
            return
        self.reference = ReferencePolicy(self.cfg, self.model, self.accelerator.device)
        if self.cfg.precompute_ref_logps:
            fields = {"ref_chosen_logps": ("input_ids", "attention_mask", "labels", 0, 2),
                      "ref_rejected_logps": ("input_ids", "attention_mask", "labels", 1, 2)}
            for data in (self.train_data, self.eval_data):
                self.reference.precompute(data, self.collator, fields, self.cfg.per_device_batch_size)
            self.reference.release()

    def count_items(self, batch) -> int:
        return batch["input_ids"].shape[0] // 2

    def reference_logps(self, batch) -> torch.Tensor | None:
        """[2P] reference sequence log-probs, chosen rows first (precomputed or from the reference)."""
        if self.reference is None:
            return None
        if "ref_chosen_logps" in batch:
            return torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
        return self.reference.logps(batch["input_ids"], batch["attention_mask"], batch["labels"])

    def compute_loss(self, model, batch):
        hidden, targets = shift(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]),
                                batch["labels"])
        ref_logps = self.reference_logps(batch)
        with full_head(model) as head:
            loss, metrics = self.loss_fn(hidden, head.weight, targets, head.bias, ref_logps=ref_logps)
        pairs = self.count_items(batch)  # the module averages over this batch's pairs; the base wants sums
        return loss * pairs, {name: value.detach() * pairs for name, value in metrics.items()}
