"""Kahneman-Tversky Optimization (Ethayarajh et al., 2024): unpaired desirable/undesirable data.

    r(x, y) = log π(y|x) − log π_ref(y|x),   z = max(0, E[r(x', y')]) over mismatched pairs (detached)
    desirable:   λ_D · (1 − σ(β·(r − z)))      undesirable:   λ_U · (1 − σ(β·(z − r)))

The KL reference point z is estimated, as in TRL, from mismatched pairs: prompt i with the
completion of example i−1 of the dataset (fixed before training, so reference log-probs can be
precomputed), averaged over the micro-batch and across processes. The loss is averaged
over the examples of the global batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from alignfast.data import UnpairedCollator
from alignfast.trainers.base import Trainer
from alignfast.trainers.config import TrainConfig, opt
from alignfast.trainers.reference import ReferencePolicy
from alignfast.trainers.sequence import sequence_logps

try:  # the functional losses of alignfast.losses, once they exist
    from alignfast.losses.kto import KTO_LOSS_TYPES, kto_kl_estimate, kto_loss
except ImportError:  # pragma: no cover - depends on which parts are built
    KTO_LOSS_TYPES, kto_kl_estimate, kto_loss = ("kto", "apo_zero_unpaired"), None, None


def kto_losses(logps, ref_logps, desirable, kl, *, beta, desirable_weight, undesirable_weight, loss_type="kto"):
    """Fallback until `alignfast.losses.kto.kto_loss` exists. Per-example losses [B] and implicit
    rewards β·r [B] (see the module docstring; APO-zero unpaired: 1 − σ(β·r) for desirable, σ(β·r) for undesirable)."""
    ratio = logps - ref_logps
    if loss_type == "kto":
        good, bad = 1 - torch.sigmoid(beta * (ratio - kl)), 1 - torch.sigmoid(beta * (kl - ratio))
    else:
        good, bad = 1 - torch.sigmoid(beta * ratio), torch.sigmoid(beta * ratio)
    losses = torch.where(desirable, desirable_weight * good, undesirable_weight * bad)
    return losses, beta * ratio.detach()


@dataclass
class KTOConfig(TrainConfig):
    beta: float = opt(0.1, "β: strength of the implicit KL to the reference")
    loss_type: str = opt("kto", "kto or apo_zero_unpaired")
    desirable_weight: float = opt(1.0, "λ_D: weight of desirable examples' losses")
    undesirable_weight: float = opt(1.0, "λ_U: weight of undesirable examples' losses")
    ref_model: str | None = opt(None, "reference model directory; default: a frozen copy of the initial policy")
    precompute_ref_logps: bool = opt(False, "compute reference log-probs once, then drop the reference model")
    disable_dropout: bool = opt(True, "set every dropout probability to 0 (TRL's default): the policy's "
                                      "log-probs are then comparable with the reference's, which runs in eval mode")
    learning_rate: float = opt(5e-7, "AdamW peak learning rate")

    stage = "kto"
    data_kind = "unpaired"

    def validate(self):
        super().validate()
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta!r}")
        if self.loss_type not in KTO_LOSS_TYPES:
            raise ValueError(f"loss_type: {self.loss_type!r} is unknown; choose one of {list(KTO_LOSS_TYPES)}")
        for key in ("desirable_weight", "undesirable_weight"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)!r}")
        if self.loss_type == "kto" and self.per_device_batch_size < 2:
            raise ValueError("per_device_batch_size must be >= 2 for loss_type=kto: the KL estimate pairs each "
                             "prompt with another example's completion")
        if self.ref_model is not None:
            from alignfast.trainers.config import _check_model_path

            _check_model_path("ref_model", self.ref_model)
        return self


class KTOTrainer(Trainer):
    config_class = KTOConfig
    data_kind = "unpaired"

    def build_collator(self):
        return UnpairedCollator(self.tokenizer.pad_token_id, with_kl=self.cfg.loss_type == "kto",
                                max_length=self.cfg.max_length)

    def setup(self):
        for data in (self.train_data, self.eval_data):  # fixed mismatched partners: example i-1's completion
            for i, e in enumerate(data):
                e["kl_completion_ids"] = data[i - 1]["completion_ids"]
        self.reference = ReferencePolicy(self.cfg, self.model, self.accelerator.device)
        if self.cfg.precompute_ref_logps:
            fields = {"ref_logps": ("input_ids", "attention_mask", "labels", 0, 1)}
            if self.cfg.loss_type == "kto":
                fields["ref_kl_logps"] = ("kl_input_ids", "kl_attention_mask", "kl_labels", 0, 1)
            for data in (self.train_data, self.eval_data):
                self.reference.precompute(data, self.collator, fields, self.cfg.per_device_batch_size)
            self.reference.release()

    def count_items(self, batch) -> int:
        return batch["input_ids"].shape[0]

    def _ref(self, batch, key, prefix=""):
        if key in batch:
            return batch[key]
        return self.reference.logps(batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"],
                                    batch[f"{prefix}labels"])

    def kl_estimate(self, model, batch) -> torch.Tensor:
        """max(0, mean over processes of mean_i[log π − log π_ref](x_i, y_{i−1})), detached."""
        if self.cfg.loss_type != "kto":
            return torch.zeros((), device=batch["input_ids"].device)
        with torch.no_grad():
            kl_logps = sequence_logps(model, batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"],
                                      backend=self.cfg.backend, chunk_size=self.cfg.chunk_size)[0]
            ref_kl_logps = self._ref(batch, "ref_kl_logps", "kl_")
            gather = self.accelerator.gather if self.accelerator.num_processes > 1 else None
            if kto_kl_estimate is not None:
                return kto_kl_estimate(kl_logps, ref_kl_logps, gather=gather)
            kl = (kl_logps - ref_kl_logps).mean()
            if gather is not None:
                kl = gather(kl[None]).mean()
        return kl.clamp(min=0)

    def compute_loss(self, model, batch):
        kl = self.kl_estimate(model, batch)
        logps = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                               backend=self.cfg.backend, chunk_size=self.cfg.chunk_size)[0]
        desirable = batch["label"]
        kwargs = dict(beta=self.cfg.beta, desirable_weight=self.cfg.desirable_weight,
                      undesirable_weight=self.cfg.undesirable_weight, loss_type=self.cfg.loss_type)
        ref_logps = self._ref(batch, "ref_logps")
        if kto_loss is not None:
            losses, r_good, r_bad = kto_loss(logps, ref_logps, desirable, kl, **kwargs)
        else:
            losses, rewards = kto_losses(logps, ref_logps, desirable, kl, **kwargs)
            r_good, r_bad = rewards[desirable], rewards[~desirable]
        return losses.sum(), {"rewards/chosen": (r_good.detach().sum(), r_good.numel()),
                              "rewards/rejected": (r_bad.detach().sum(), r_bad.numel()),
                              "kl": kl * desirable.numel()}
