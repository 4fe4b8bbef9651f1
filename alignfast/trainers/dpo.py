"""Direct Preference Optimization (Rafailov et al., 2023) and its variants, via `dpo_loss`.

    logits = β·[(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))]
    sigmoid loss = −log σ(logits)   (other `loss_type`s as in TRL)

Chosen and rejected run in one forward (rows [0, B) and [B, 2B) of the batch). Sequence log-probs
come from the fused `linear_logprobs`; the loss is averaged over the pairs of the global batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alignfast.data import PreferenceCollator
from alignfast.trainers.base import Trainer
from alignfast.trainers.config import TrainConfig, opt
from alignfast.trainers.reference import ReferencePolicy
from alignfast.trainers.sequence import sequence_logps

try:  # the functional loss of alignfast.losses, once it exists
    from alignfast.losses.dpo import dpo_loss as _dpo_loss
except ImportError:  # pragma: no cover - depends on which parts are built
    _dpo_loss = None

# TRL's DPO loss types; the built-in fallback (used until alignfast.losses.dpo exists) has the first three.
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_pair", "apo_zero", "apo_down", "discopop", "sft")
FALLBACK_LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def loss_types() -> tuple[str, ...]:
    if _dpo_loss is None:
        return FALLBACK_LOSS_TYPES
    import alignfast.losses.dpo as mod

    registry = getattr(mod, "DPO_LOSSES", None)
    return tuple(registry) if registry else DPO_LOSS_TYPES


def _fallback_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, *, beta, loss_type, label_smoothing=0.0,
                       chosen_lengths=None, rejected_lengths=None, **_):
    """sigmoid / hinge / ipo, TRL's formulas (IPO on length-averaged log-probs)."""
    if loss_type == "ipo":
        chosen, ref_chosen = chosen / chosen_lengths, ref_chosen / chosen_lengths
        rejected, ref_rejected = rejected / rejected_lengths, ref_rejected / rejected_lengths
    logits = (chosen - ref_chosen) - (rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    return losses, beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()


def dpo_loss(*args, **kwargs):
    return (_dpo_loss or _fallback_dpo_loss)(*args, **kwargs)


@dataclass
class DPOConfig(TrainConfig):
    beta: float = opt(0.1, "β: strength of the implicit KL to the reference")
    loss_type: str = opt("sigmoid", "DPO loss type (sigmoid, hinge, ipo, ... as TRL)")
    label_smoothing: float = opt(0.0, "conservative DPO / robust label noise, in [0, 0.5)")
    ref_model: str | None = opt(None, "reference model directory; default: a frozen copy of the initial policy")
    precompute_ref_logps: bool = opt(False, "compute reference log-probs once, then drop the reference model")
    learning_rate: float = opt(5e-7, "AdamW peak learning rate")

    stage = "dpo"
    data_kind = "preference"

    def validate(self):
        super().validate()
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta!r}")
        if self.loss_type not in loss_types():
            raise ValueError(f"loss_type: {self.loss_type!r} is unknown; choose one of {list(loss_types())}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}")
        if self.ref_model is not None:
            from alignfast.trainers.config import _check_model_path

            _check_model_path("ref_model", self.ref_model)
        return self


class DPOTrainer(Trainer):
    config_class = DPOConfig
    data_kind = "preference"

    def build_collator(self):
        return PreferenceCollator(self.tokenizer.pad_token_id)

    def setup(self):
        self.reference = ReferencePolicy(self.cfg, self.model, self.accelerator.device)
        if self.cfg.precompute_ref_logps:
            fields = {"ref_chosen_logps": ("input_ids", "attention_mask", "labels", 0, 2),
                      "ref_rejected_logps": ("input_ids", "attention_mask", "labels", 1, 2)}
            for data in (self.train_data, self.eval_data):
                self.reference.precompute(data, self.collator, fields, self.cfg.per_device_batch_size)
            self.reference.release()

    def count_items(self, batch) -> int:
        return batch["input_ids"].shape[0] // 2

    def compute_loss(self, model, batch):
        logps, lengths = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                        backend=self.cfg.backend, chunk_size=self.cfg.chunk_size)
        chosen, rejected = logps.chunk(2)
        if "ref_chosen_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.reference.logps(
                batch["input_ids"], batch["attention_mask"], batch["labels"]).chunk(2)
        len_c, len_r = lengths.float().chunk(2)
        losses, r_chosen, r_rejected = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=self.cfg.beta,
                                                loss_type=self.cfg.loss_type,
                                                label_smoothing=self.cfg.label_smoothing,
                                                chosen_lengths=len_c, rejected_lengths=len_r)
        r_chosen, r_rejected = r_chosen.detach(), r_rejected.detach()
        return losses.sum(), {"rewards/chosen": r_chosen.sum(), "rewards/rejected": r_rejected.sum(),
                              "rewards/accuracies": (r_chosen > r_rejected).float().sum(),
                              "rewards/margins": (r_chosen - r_rejected).sum(),
                              "logps/chosen": chosen.detach().sum(), "logps/rejected": rejected.detach().sum()}
