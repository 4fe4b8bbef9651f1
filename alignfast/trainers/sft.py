"""Supervised fine-tuning: fused cross-entropy on the completion tokens (prompt masked).

loss = Σ_{completion tokens} −log π(y_t | x, y_<t) / (completion tokens in the global batch), the
token-level mean TRL's SFTTrainer computes with `num_items_in_batch`.

`packing=True`: the examples are packed best-fit-decreasing into rows of ≤ max_length tokens, each
example attending only to itself (alignfast/data/packing.py); the loss is that of the examples unpacked.
"""
from __future__ import annotations

from dataclasses import dataclass

from alignfast.data import PackedCollator, SFTCollator, pack_examples, packed_inputs
from alignfast.ops import linear_cross_entropy
from alignfast.trainers.base import Trainer
from alignfast.trainers.config import TrainConfig, opt
from alignfast.trainers.modeling import full_head, unwrap_causal_lm
from alignfast.trainers.sequence import shift


@dataclass
class SFTConfig(TrainConfig):
    completion_only_loss: bool = opt(True, "loss on completion tokens only (prompt masked with -100)")
    label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy, in [0, 1]")
    packing: bool = opt(False, "pack examples best-fit-decreasing into rows of <= max_length tokens, each "
                               "attending only to itself (per_device_batch_size then counts rows)")

    stage = "sft"
    data_kind = "sft"

    def validate(self):
        super().validate()
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing!r}")
        if self.packing and self.max_length is None:
            raise ValueError("packing: needs max_length (the length of a packed row)")
        return self


class SFTTrainer(Trainer):
    config_class = SFTConfig
    data_kind = "sft"

    def _load_data(self, train_source, eval_source):
        train, evals = super()._load_data(train_source, eval_source)
        if not self.cfg.packing:
            return train, evals
        return pack_examples(train, self.cfg.max_length), pack_examples(evals, self.cfg.max_length)

    def build_collator(self):
        collator = PackedCollator if self.cfg.packing else SFTCollator
        return collator(self.tokenizer.pad_token_id, completion_only=self.cfg.completion_only_loss)

    def setup(self):
        self.attn_implementation = getattr(unwrap_causal_lm(self.model).config, "_attn_implementation", None)

    def count_items(self, batch) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())

    def compute_loss(self, model, batch):
        if self.cfg.packing:  # 4D block-diagonal mask, or padding-free rows under flash attention
            inputs, labels = packed_inputs(batch, self.attn_implementation)
        else:
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            labels = batch["labels"]
        hidden, targets = shift(model(**inputs), labels)
        with full_head(model) as head:
            loss = linear_cross_entropy(hidden, head.weight, targets, head.bias, reduction="sum",
                                        softcap=head.softcap, label_smoothing=self.cfg.label_smoothing,
                                        backend=self.cfg.backend, chunk_size=self.cfg.chunk_size)
        return loss, {}
