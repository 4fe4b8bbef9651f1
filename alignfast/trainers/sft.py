"""Supervised fine-tuning: fused cross-entropy on the completion tokens (prompt masked).

loss = Σ_{completion tokens} −log π(y_t | x, y_<t) / (completion tokens in the global batch), the
token-level mean TRL's SFTTrainer computes with `num_items_in_batch`.
"""
from __future__ import annotations

from dataclasses import dataclass

from alignfast.data import SFTCollator
from alignfast.ops import linear_cross_entropy
from alignfast.trainers.base import Trainer
from alignfast.trainers.config import TrainConfig, opt
from alignfast.trainers.modeling import full_head
from alignfast.trainers.sequence import shift


@dataclass
class SFTConfig(TrainConfig):
    completion_only_loss: bool = opt(True, "loss on completion tokens only (prompt masked with -100)")
    label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy, in [0, 1]")

    stage = "sft"
    data_kind = "sft"

    def validate(self):
        super().validate()
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing!r}")
        return self


class SFTTrainer(Trainer):
    config_class = SFTConfig
    data_kind = "sft"

    def build_collator(self):
        return SFTCollator(self.tokenizer.pad_token_id, completion_only=self.cfg.completion_only_loss)

    def count_items(self, batch) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())

    def compute_loss(self, model, batch):
        hidden, targets = shift(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]),
                                batch["labels"])
        with full_head(model) as head:
            loss = linear_cross_entropy(hidden, head.weight, targets, head.bias, reduction="sum",
                                        softcap=head.softcap, label_smoothing=self.cfg.label_smoothing,
                                        backend=self.cfg.backend, chunk_size=self.cfg.chunk_size)
        return loss, {}
