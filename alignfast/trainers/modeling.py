"""Model and tokenizer loading, and the backbone/head split every trainer relies on.

A trainer never calls the `lm_head`: `HiddenStatesModel` runs the backbone only and returns the
last hidden states [B, T, H]; the head's weight (and bias, softcap) goes to a fused loss.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
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


def attn_implementation(cfg) -> str:
    """cfg.attn_implementation, with "auto" resolved: flash-attention 2 where it can run (a CUDA device
    and the flash_attn package; SFT packing then goes padding-free), else PyTorch's SDPA."""
    choice = getattr(cfg, "attn_implementation", "auto")
    if choice != "auto":
        return choice
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None \
            and DTYPES[cfg.dtype] in (torch.bfloat16, torch.float16):
        return "flash_attention_2"
    return "sdpa"


def load_causal_lm(cfg, path: str | None = None):
    """AutoModelForCausalLM from `path` (default cfg.model), safetensors weights, no remote code
    unless `trust_remote_code`, attention per `attn_implementation(cfg)`."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path or cfg.model, dtype=DTYPES[cfg.dtype],
                                                attn_implementation=attn_implementation(cfg),
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


def _gather_dtensor(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of an FSDP2-sharded parameter (a DTensor), differentiable.

    Forward: all-gather. Backward: each process holds the gradient of its own micro-batch's loss, so
    the gradient is declared `Partial("sum")` and reduce-scattered back to the shards, then divided
    by the number of processes: the same average FSDP2 (and DDP) apply to every other parameter."""
    from torch.distributed.tensor import Partial

    if not (torch.is_grad_enabled() and t.requires_grad):
        return t.full_tensor()
    full = t.full_tensor(grad_placements=[Partial("sum")] * t.device_mesh.ndim)
    world = t.device_mesh.size()
    if world > 1:
        full.register_hook(lambda g: g / world)
    return full


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


@contextlib.contextmanager
def full_head(model: nn.Module):
    """The output head of `model` (a `HiddenStatesModel`, possibly wrapped by DDP/FSDP/DeepSpeed) with
    its *full* weight, for the duration of the block:

        with full_head(model) as head:
            loss = linear_cross_entropy(hidden, head.weight, targets, head.bias, softcap=head.softcap)

    - plain / DDP: the parameter itself;
    - FSDP2 (`fully_shard`, parameters are DTensors sharded on dim 0): gathered with
      `full_tensor()`; the gradient is reduce-scattered back to the shards (see `_gather_dtensor`).
      (FSDP2 keeps the root module's parameters unsharded between forward and backward; then the
      weight is already a plain full tensor and is used as is.)
    - DeepSpeed ZeRO-3 (parameters carry `ds_id` and hold an empty partition outside their
      module's forward): gathered with `deepspeed.zero.GatheredParameters` for the block. The fused
      losses compute the weight's gradient inside their forward (backends chunked/cpp/cuda), while
      the weight is gathered; register the head as an external parameter of the wrapped module
      (`deepspeed.zero.register_external_parameter`) so ZeRO-3 reduces its gradient. Not tested here
      (deepspeed is not a dependency).
    """
    inner = model
    while hasattr(inner, "module") and not isinstance(inner, HiddenStatesModel):  # DDP / DeepSpeed engine
        inner = inner.module
    head = inner.head() if isinstance(inner, HiddenStatesModel) else output_head(inner)
    tensors = [t for t in (head.weight, head.bias) if t is not None]
    if any(hasattr(t, "ds_id") for t in tensors):
        import deepspeed

        with deepspeed.zero.GatheredParameters(tensors, modifier_rank=None):
            yield head
        return
    if any(_is_dtensor(t) for t in tensors):
        head = Head(_gather_dtensor(head.weight), None if head.bias is None else _gather_dtensor(head.bias),
                    head.softcap)
    yield head


class HiddenStatesModel(nn.Module):
    """Wraps a causal LM so its forward returns the backbone's last hidden states [B, T, H], never
    logits. This is the module Accelerate prepares (DDP hooks then cover backbone and head alike:
    the head's weight is used by the loss after the forward)."""

    def __init__(self, causal_lm: nn.Module):
        super().__init__()
        self.causal_lm = causal_lm

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        """attention_mask: [B, T] (1 on tokens), or a 4D mask / None for packed rows (`data/packing.py`)."""
        out = backbone(self.causal_lm)(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids, use_cache=False)
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


def disable_dropout(module: nn.Module) -> nn.Module:
    """Sets every dropout probability to 0, as TRL does by default for PPO (the rollout's log-probs and
    values must be those the first update sees: ρ = 1, V = V_old) and for DPO, KTO and reward models
    (`disable_dropout`: the implicit rewards compare the policy with the reference in the same mode)."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for name in ("attention_dropout", "dropout"):  # attention modules keep a float, not a module
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)
    return module
