"""Reward modelling: a scalar head on the last non-pad token, Bradley-Terry loss.

    loss = −log σ(r_chosen − r_rejected − margin) + c · (r_chosen + r_rejected)²

(margin: the record's optional `margin` column, as in Llama 2; c: `center_rewards_coefficient`,
Eisenstein et al. 2023, as TRL's RewardTrainer). Rows [0, B) of a batch are the chosen sequences,
[B, 2B) the rejected ones, scored in one forward. The score is a [H] -> 1 projection of one hidden
state per sequence: there is no vocab projection at all. The model is saved as a Hugging Face
`*ForSequenceClassification` with one label, so later stages (PPO) load it with the Auto class.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from alignfast.data import PreferenceCollator
from alignfast.losses.reward import reward_loss
from alignfast.trainers.base import Trainer
from alignfast.trainers.config import TrainConfig, opt
from alignfast.trainers.modeling import DTYPES, backbone

@dataclass
class RewardConfig(TrainConfig):
    center_rewards_coefficient: float = opt(0.0, "weight of the (r_chosen + r_rejected)² centering term")
    use_margin: bool = opt(True, "subtract the record's `margin` column when present")
    disable_dropout: bool = opt(True, "set every dropout probability to 0 (TRL's default for reward models)")

    stage = "reward"
    data_kind = "preference"

    def validate(self):
        super().validate()
        if self.center_rewards_coefficient < 0:
            raise ValueError(f"center_rewards_coefficient must be >= 0, got {self.center_rewards_coefficient!r}")
        return self


class ScalarHeadModel(nn.Module):
    """A sequence-classification model (num_labels=1) run as backbone + score head on the last
    non-pad token (right padding: position attention_mask.sum() − 1). forward -> rewards [B] fp32."""

    def __init__(self, seq_cls_model: nn.Module):
        super().__init__()
        self.seq_cls = seq_cls_model

    def forward(self, input_ids, attention_mask):
        hidden = backbone(self.seq_cls)(input_ids=input_ids, attention_mask=attention_mask,
                                        use_cache=False).last_hidden_state
        last = attention_mask.sum(-1).clamp(min=1) - 1
        h_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.score_head()(h_last).squeeze(-1).float()

    def score_head(self) -> nn.Module:
        model = self.seq_cls.get_base_model() if hasattr(self.seq_cls, "get_base_model") else self.seq_cls
        head = getattr(model, "score", None) or getattr(model, "classifier", None)
        if head is None:
            raise ValueError(f"{type(model).__name__} has no `score` head")
        return head


def load_reward_model(cfg, source, pad_token_id: int) -> ScalarHeadModel:
    """A frozen, eval-mode `ScalarHeadModel` from a directory, a sequence-classification model or a
    `ScalarHeadModel` (what the online stages score completions with)."""
    if isinstance(source, str):
        from transformers import AutoModelForSequenceClassification

        source = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=1, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True)
    model = source if isinstance(source, ScalarHeadModel) else ScalarHeadModel(source)
    if getattr(model.seq_cls.config, "pad_token_id", None) is None:
        model.seq_cls.config.pad_token_id = pad_token_id
    return model.eval().requires_grad_(False)


class RewardTrainer(Trainer):
    config_class = RewardConfig
    data_kind = "preference"

    def build_model(self, model):
        if model is None:
            from transformers import AutoModelForSequenceClassification

            model = AutoModelForSequenceClassification.from_pretrained(
                self.cfg.model, num_labels=1, dtype=DTYPES[self.cfg.dtype],
                trust_remote_code=self.cfg.trust_remote_code, use_safetensors=True)
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        if self.cfg.use_peft:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=self.cfg.lora_r, lora_alpha=self.cfg.lora_alpha, task_type="SEQ_CLS",
                              lora_dropout=self.cfg.lora_dropout, target_modules=list(self.cfg.lora_target_modules))
            model = get_peft_model(model, lora)
        return ScalarHeadModel(model)

    def build_collator(self):
        return PreferenceCollator(self.tokenizer.pad_token_id)

    def count_items(self, batch) -> int:
        return batch["input_ids"].shape[0] // 2

    def compute_loss(self, model, batch):
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        chosen, rejected = rewards.chunk(2)
        margin = batch.get("margin") if self.cfg.use_margin else None
        mean, _ = reward_loss(chosen, rejected, margin=margin,  # a batch mean: the sum over pairs is mean × B
                              center_rewards_coefficient=self.cfg.center_rewards_coefficient or None)
        loss_sum = mean * chosen.shape[0]
        d = (chosen - rejected).detach()
        return loss_sum, {"accuracy": (d > 0).float().sum(), "margin": d.sum(),
                              "rewards/chosen": chosen.detach().sum(), "rewards/rejected": rejected.detach().sum()}

    def save_model(self, path: str) -> None:
        state = self._full_state("seq_cls.")
        if self.accelerator.is_main_process:
            self.accelerator.unwrap_model(self.model).seq_cls.save_pretrained(path, state_dict=state)
            self.tokenizer.save_pretrained(path)


