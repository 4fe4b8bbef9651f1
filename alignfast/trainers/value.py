"""PPO's value model, and the one module that holds PPO's two trainable models.

The value model is a sequence-classification model with one label (what `RewardTrainer` saves) run
on *every* position: backbone → score head [H] → 1 per token, so V_t is the value of the state
"prompt + completion up to token t". With right padding and shifted targets (token t+1 is predicted
from the hidden state at t), `values[:, :-1]` lines up with the policy's per-token log-probs.

Policy and value go through one optimizer and one `accelerator.prepare` (one DDP/FSDP wrapper, one
gradient clip over both), so they live in one `nn.Module`, `PolicyAndValue`, whose forward runs
both and returns (policy hidden states, values): no [tokens, vocab] logits here either.
"""
from __future__ import annotations

import copy

from torch import nn

from alignfast.trainers.modeling import DTYPES, HiddenStatesModel, backbone
from alignfast.trainers.reward import ScalarHeadModel


class ValueModel(ScalarHeadModel):
    """forward(input_ids [B, T], attention_mask [B, T]) -> values [B, T] fp32 (every position)."""

    def forward(self, input_ids, attention_mask):
        hidden = backbone(self.seq_cls)(input_ids=input_ids, attention_mask=attention_mask,
                                        use_cache=False).last_hidden_state
        return self.score_head()(hidden).squeeze(-1).float()


def load_value_model(cfg, source, pad_token_id: int) -> ValueModel:
    """A trainable `ValueModel` from `source`: a directory (a sequence-classification checkpoint, or a
    causal LM whose missing score head is freshly initialised), or a model object (a
    sequence-classification model or `ScalarHeadModel`, deep-copied: the frozen reward model it may
    be stays untouched)."""
    if isinstance(source, str):
        from transformers import AutoModelForSequenceClassification

        seq_cls = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=1, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True)
    else:
        seq_cls = copy.deepcopy(source.seq_cls if isinstance(source, ScalarHeadModel) else source)
    if getattr(seq_cls.config, "pad_token_id", None) is None:
        seq_cls.config.pad_token_id = pad_token_id
    return ValueModel(seq_cls).train().requires_grad_(True)


class PolicyAndValue(nn.Module):
    """The trainable half of PPO: `.policy` (a `HiddenStatesModel`) and `.value` (a `ValueModel`).

    forward(input_ids, attention_mask) -> (policy hidden states [B, T, H], values [B, T] fp32)."""

    def __init__(self, policy: HiddenStatesModel, value: ValueModel):
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, input_ids, attention_mask):
        return self.policy(input_ids, attention_mask), self.value(input_ids, attention_mask)



