"""Model and tokenizer loading, and the backbone/head split every trainer relies on.

A trainer never calls the `lm_head`: `HiddenStatesModel` runs the backbone only and returns the
last hidden states [B, T, H]; the head's weight (and bias, softcap) goes to a fused loss.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(cfg):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError("tokenizer: it has neither a pad nor an eos token to pad with")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_causal_lm(cfg, path: str | None = None):
    """AutoModelForCausalLM from `path` (default cfg.model), safetensors weights, no remote code
    unless `trust_remote_code`."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path or cfg.model, dtype=DTYPES[cfg.dtype],
                                                trust_remote_code=cfg.trust_remote_code, use_safetensors=True)


def apply_peft(cfg, model):
    """Wraps `model` with LoRA adapters when `cfg.use_peft` (the base weights stay frozen)."""
    if not cfg.use_peft:
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def backbone(model: nn.Module) -> nn.Module:
    """The transformer without its output head (`get_decoder()`, `.model` or `.base_model`)."""
    inner = model
    if hasattr(inner, "get_base_model"):  # peft: adapters stay active inside the base model's modules
        inner = inner.get_base_model()
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    if decoder is None or decoder is inner:
        decoder = getattr(inner, "model", None) or getattr(inner, "base_model", None)
    if decoder is None or decoder is inner:
        raise ValueError(f"cannot find the backbone of {type(model).__name__}: expected get_decoder(), "
                         ".model or .base_model")
    return decoder


@dataclass(frozen=True)
class Head:
    """What a fused loss needs of the output layer."""

    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]
    softcap: float | None  # Gemma 2's final_logit_softcapping


def output_head(model: nn.Module) -> Head:
    lm_head = model.get_output_embeddings()
    if lm_head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head)")
    config = getattr(model, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    return Head(lm_head.weight, getattr(lm_head, "bias", None), softcap)


class HiddenStatesModel(nn.Module):
    """Wraps a causal LM so its forward returns the backbone's last hidden states [B, T, H], never
    logits. This is the module Accelerate prepares (DDP hooks then cover backbone and head alike:
    the head's weight is used by the loss after the forward)."""

    def __init__(self, causal_lm: nn.Module):
        super().__init__()
        self.causal_lm = causal_lm

    def forward(self, input_ids, attention_mask):
        out = backbone(self.causal_lm)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    def head(self) -> Head:
        return output_head(self.causal_lm)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen, eval-mode deep copy (the reference model of DPO/KTO)."""
    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def unwrap_causal_lm(module: nn.Module) -> nn.Module:
    return module.causal_lm if isinstance(module, HiddenStatesModel) else module
