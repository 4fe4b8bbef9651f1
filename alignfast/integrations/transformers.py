"""Hugging Face causal LMs without logits: the backbone's hidden states, the output head, a fused loss.

    head = output_head(model)                        # weight [V, H], bias, softcap, scale
    hidden = last_hidden_states(model, input_ids, attention_mask)   # [B, T, H], backbone only
    loss = causal_lm_loss(hidden, head, labels)      # == the model's own loss, no [B·T, V] logits

    apply(model)             # model(input_ids, labels=...) -> output with the fused `loss`, logits=None
    revert(model)            # the original forward again, exactly

Works for any `*ForCausalLM` whose forward is "backbone -> slice `logits_to_keep` -> `lm_head` ->
post-processing -> `loss_function`" (Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi, Phi-3, GPT-2,
GPT-NeoX, Cohere, Granite, MoE models such as Mixtral, ...), tied embeddings included, and for PEFT
models wrapping one. The only per-architecture knowledge, the logit post-processing (softcapping,
logit scales), is the table in `alignfast.integrations.model_quirks`. Nothing global is patched:
`apply` sets a forward on the one model instance and `revert` removes it.

Differences from Hugging Face's loss: a batch whose labels are all -100 gives 0 (HF: NaN), and a model
whose `loss_function` was replaced by the user is not consulted (the loss is causal-LM CE).

Supported: transformers >= 4.46 (the `num_items_in_batch` convention); tested with 5.25 (every causal-LM class).
"""
from __future__ import annotations

import functools
import inspect
import sys
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from alignfast.integrations.model_quirks import head_constants
from alignfast.ops.cross_entropy import linear_cross_entropy

__all__ = ["OutputHead", "output_head", "backbone", "last_hidden_states", "causal_lm_loss", "apply",
           "revert", "is_applied", "LOSS_OPTIONS"]

# Keyword arguments of `apply` / `causal_lm_loss` that go to `linear_cross_entropy`.
LOSS_OPTIONS = ("backend", "chunk_size", "label_smoothing", "z_loss")
# Arguments of a `*ForCausalLM.forward` that belong to the head/loss, not to the backbone.
_HEAD_ARGS = ("labels", "logits_to_keep", "num_items_in_batch", "shift_labels", "ignore_index", "return_dict")
_STATE = "_alignfast_state"


@dataclass(frozen=True)
class OutputHead:
    """The output projection of a causal LM, as the fused ops take it.

    logits = softcap·tanh(scale·(hidden @ weight.T + bias) / softcap)   (softcap None: no tanh)

    weight: [V, H] (the `lm_head` weight, i.e. the input embedding when tied); bias: [V] | None.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None = None
    scale: float = 1.0


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PEFT wrapper (`PeftModel.get_base_model()`), else `model`."""
    get_base_model = getattr(model, "get_base_model", None)
    if callable(get_base_model) and type(model).__module__.startswith("peft"):
        return get_base_model()
    return model


def output_head(model: nn.Module) -> OutputHead:
    """The `lm_head` weight/bias and the logit post-processing of `model`'s config; no logits computed."""
    model = unwrap(model)
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None)")
    if (hasattr(head, "lora_A") and len(head.lora_A) and not getattr(head, "merged", False)
            and not getattr(head, "disable_adapters", False)):
        raise NotImplementedError(f"the lm_head of {type(model).__name__} carries a LoRA adapter "
                                  f"({type(head).__name__}); merge it or leave the lm_head out of "
                                  f"target_modules")
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise NotImplementedError(f"unsupported output head {type(head).__name__}: expected a Linear-like "
                                  f"module with a [vocab, hidden] weight")
    bias = getattr(head, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    softcap, scale, vocab = head_constants(model.config)
    if vocab is not None and vocab < weight.shape[0]:  # padded head rows outside the vocabulary
        weight, bias = weight[:vocab], None if bias is None else bias[:vocab]
    return OutputHead(weight, bias, softcap, scale)


def backbone(model: nn.Module) -> nn.Module:
    """The module under the `lm_head`: `model.<base_model_prefix>` (e.g. `model.model`, GPT-2's
    `model.transformer`, GPT-NeoX's `model.gpt_neox`), falling back to `model.get_decoder()`, then to
    `model.model` (Llama 4 and Mllama name a `language_model` prefix their causal LM class does not have)."""
    model = unwrap(model)
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model:
        return base
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder) and get_decoder() is not model:
        return get_decoder()
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and inner is not model:
        return inner
    raise ValueError(f"cannot find the backbone of {type(model).__name__}: no `{model.base_model_prefix}` "
                     f"attribute and no decoder")


def last_hidden_states(model: nn.Module, input_ids: torch.Tensor | None = None,
                       attention_mask: torch.Tensor | None = None, *, logits_to_keep: int | torch.Tensor = 0,
                       **kwargs) -> torch.Tensor:
    """The hidden states the `lm_head` would see: [B, T, H] ([B, k, H] with `logits_to_keep`).

    Runs the backbone only; `kwargs` (position_ids, inputs_embeds, pixel_values, ...) go to it.
    """
    model = unwrap(model)
    out = _call_backbone(model, dict(input_ids=input_ids, attention_mask=attention_mask, **kwargs))
    return _slice_to_keep(out[0], logits_to_keep)


def causal_lm_loss(hidden: torch.Tensor, head: OutputHead, labels: torch.Tensor | None = None, *,
                   shift_labels: torch.Tensor | None = None, num_items_in_batch: Any = None,
                   ignore_index: int = -100, **loss_options) -> torch.Tensor:
    """Hugging Face's `ForCausalLMLoss`, fused: position t predicts labels[t+1].

    hidden: [B, T, H] (or [..., H]); labels: [B, T] (shifted here), or `shift_labels` already
    aligned with `hidden`. With `num_items_in_batch` (gradient accumulation), the loss is the
    sum over tokens divided by it, as in transformers; otherwise the mean over non-ignored tokens.
    `loss_options`: backend, chunk_size, label_smoothing, z_loss of `linear_cross_entropy`.
    """
    _check_loss_options(loss_options)
    if shift_labels is None:
        if labels is None:
            raise ValueError("causal_lm_loss needs labels or shift_labels")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    weight = head.weight
    hidden = hidden.to(weight.device)
    if hidden.shape[:-1] != shift_labels.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} do not match the (shifted) labels "
                         f"{tuple(shift_labels.shape)}; with logits_to_keep, labels must cover the kept "
                         f"positions")
    bias = head.bias
    if head.scale != 1.0:
        hidden = hidden * head.scale
        bias = None if bias is None else bias * head.scale
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = linear_cross_entropy(hidden, weight, shift_labels.to(weight.device), bias,
                                ignore_index=ignore_index, reduction=reduction, softcap=head.softcap,
                                **loss_options)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


# -- apply / revert -------------------------------------------------------------------------------

@dataclass
class _State:
    loss_options: dict
    previous_forward: Any  # the instance-level forward that was there before (accelerate hooks), or None


def apply(model: nn.Module, **loss_options) -> nn.Module:
    """Make `model(..., labels=...)` return the fused loss (and `logits=None`); returns `model`.

    Only this instance changes: its `forward` becomes a bound wrapper (same signature, so
    `Trainer` still sees the columns and `**kwargs`). Calls without labels run the original
    forward unchanged. `loss_options`: backend, chunk_size, label_smoothing, z_loss.
    Applying again replaces the options. Undo with `revert(model)`.
    """
    _check_loss_options(loss_options)
    target = unwrap(model)
    output_head(target)  # fail now, not at the first step, on an unsupported head
    _check_head_is_the_model_s(target)
    backbone(target)
    if is_applied(target):
        revert(target)
    previous = target.__dict__.get("forward")
    setattr(target, _STATE, _State(dict(loss_options), previous))
    target.forward = types.MethodType(_make_forward(type(target).forward), target)
    return model


def _check_head_is_the_model_s(model: nn.Module) -> None:
    """Output embeddings nested in a head module beside other layers (BERT's `cls.predictions.decoder` after
    `cls.predictions.transform`, RoBERTa's `lm_head.decoder` after `lm_head.dense`) sit behind a transform of
    the hidden states that the fused ops would skip: a silently different loss, for a type outside the quirks
    table. A wrapper holding the head alone (BertGeneration's `lm_head.decoder`) is fine."""
    head = model.get_output_embeddings()
    path = next((name for name, module in model.named_modules() if module is head), None)
    if path is None or "." not in path:
        return
    parent = model.get_submodule(path.rsplit(".", 1)[0])
    others = [name for name, child in parent.named_children()
              if child is not head and any(p.numel() for p in child.parameters())]
    if others:
        raise NotImplementedError(f"the output embeddings of {type(model).__name__} are `{path}`, inside a "
                                  f"prediction head with other layers ({', '.join(others)}) that transform the "
                                  f"hidden states first; the fused loss would skip them")


def revert(model: nn.Module) -> nn.Module:
    """Undo `apply`: the instance's forward is exactly what it was before. No-op if not applied."""
    target = unwrap(model)
    state = target.__dict__.get(_STATE)
    if state is None:
        return model
    del target.__dict__["forward"]
    if state.previous_forward is not None:
        target.forward = state.previous_forward
    delattr(target, _STATE)
    return model


def is_applied(model: nn.Module) -> bool:
    return _STATE in unwrap(model).__dict__


def _make_forward(class_forward):
    # The wrapper advertises the class forward's signature: Trainer inspects it for columns and **kwargs.
    @functools.wraps(class_forward)
    def forward(self, *args, **kwargs):
        return _fused_forward(self, *args, **kwargs)
    forward.__signature__ = inspect.signature(class_forward)
    return forward


def _original_forward(model):
    state = model.__dict__[_STATE]
    if state.previous_forward is not None:
        return state.previous_forward
    return type(model).forward.__get__(model)


def _fused_forward(model, *args, **kwargs):
    original = _original_forward(model)
    call = _named_arguments(type(model).forward.__get__(model), args, kwargs)
    if call.get("labels") is None and call.get("shift_labels") is None:
        return original(*args, **kwargs)
    labels, logits_to_keep = call.pop("labels", None), call.pop("logits_to_keep", 0)
    num_items, shift_labels = call.pop("num_items_in_batch", None), call.pop("shift_labels", None)
    ignore_index, return_dict = call.pop("ignore_index", -100), call.pop("return_dict", None)

    if "labels" in _parameters(backbone(model)):  # multimodal backbones use labels for their masks
        call["labels"] = labels
    wants_router = "output_router_logits" in _parameters(type(model).forward)
    if wants_router and call.get("output_router_logits") is None:
        # as the model's own forward does: its default, which is None ("the config's") in most models but
        # a fixed False in some (JetMoE in transformers 5.17, whatever the config says)
        default = inspect.signature(type(model).forward).parameters["output_router_logits"].default
        call["output_router_logits"] = (getattr(model.config, "output_router_logits", False)
                                        if default is None or default is inspect.Parameter.empty else default)
    out = _call_backbone(model, call)

    hidden = _slice_to_keep(out[0], logits_to_keep)
    loss = causal_lm_loss(hidden, output_head(model), labels, shift_labels=shift_labels,
                          num_items_in_batch=num_items, ignore_index=ignore_index,
                          **model.__dict__[_STATE].loss_options)
    aux_loss = None
    if wants_router and call["output_router_logits"]:
        aux_loss, coef = _router_aux_loss(model, out, call.get("attention_mask"))
        loss = loss + coef * aux_loss.to(loss.device)
    output = _causal_lm_output(out, loss, aux_loss)
    if return_dict is not False:
        return output
    # the model's own tuple, with None in the logits slot (`to_tuple` would drop it and shift the rest)
    return tuple(getattr(output, name) for name in output.__dataclass_fields__
                 if name == "logits" or getattr(output, name) is not None)


def _named_arguments(fn, args, kwargs) -> dict:
    """`fn`'s arguments by name, with its **kwargs merged in (positional order differs per model)."""
    try:
        bound = inspect.signature(fn).bind_partial(*args, **kwargs)
    except TypeError as err:
        raise TypeError(f"alignfast.apply: arguments do not fit {fn.__qualname__}: {err}") from err
    call = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            call.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"alignfast.apply: unexpected positional arguments for {fn.__qualname__}")
        else:
            call[name] = value
    return call


@functools.lru_cache(maxsize=None)
def _parameters_of(fn) -> frozenset:
    return frozenset(inspect.signature(fn).parameters)


def _parameters(obj) -> frozenset:
    fn = obj.forward if isinstance(obj, nn.Module) else obj
    return _parameters_of(getattr(fn, "__func__", fn))


def _call_backbone(model, call: dict):
    call = {k: v for k, v in call.items() if k not in _HEAD_ARGS or k == "labels"}
    return backbone(model)(**call)


def _slice_to_keep(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """transformers' `slice_logits_to_keep` (int: the last k positions, 0 = all; tensor: indices/mask)."""
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:  # older transformers (5.17 among them): 1-D index tensors only, as its models take
        return hidden[:, logits_to_keep]
    return slice_logits_to_keep(hidden, logits_to_keep)


def _router_aux_loss(model, out, attention_mask):
    """(the MoE load-balancing loss, its coefficient), from the model's own module
    (`load_balancing_loss_func`, called as Mixtral's: router logits, experts, top-k, attention mask)."""
    fn = getattr(sys.modules[type(model).__module__], "load_balancing_loss_func", None)
    router_logits = getattr(out, "router_logits", None)
    text = model.config.get_text_config()
    experts = getattr(model, "num_experts", None) or getattr(text, "num_local_experts", None)
    top_k = getattr(model, "num_experts_per_tok", None) or getattr(text, "num_experts_per_tok", None)
    coef = next((getattr(model, k) for k in ("router_aux_loss_coef", "aux_loss_coef") if hasattr(model, k)), None)
    mixtral_like = fn is not None and list(inspect.signature(fn).parameters)[1:3] == ["num_experts", "top_k"]
    if not mixtral_like or router_logits is None or experts is None or top_k is None or coef is None:
        raise NotImplementedError(f"alignfast: the router aux loss of {type(model).__name__} is not "
                                  f"supported; set output_router_logits=False")
    return fn(router_logits, experts, top_k, attention_mask), coef


def _causal_lm_output(out, loss, aux_loss):
    """The output class the model would return, carrying the backbone's extra fields, logits=None."""
    from transformers import modeling_outputs as mo

    if aux_loss is not None or getattr(out, "router_logits", None) is not None:
        cls = mo.MoeCausalLMOutputWithPast
    elif getattr(out, "cross_attentions", None) is not None:
        cls = mo.CausalLMOutputWithCrossAttentions
    else:
        cls = mo.CausalLMOutputWithPast
    fields = {name: getattr(out, name, None) for name in cls.__dataclass_fields__
              if name not in ("loss", "logits", "aux_loss")}
    extra = {"aux_loss": aux_loss} if "aux_loss" in cls.__dataclass_fields__ else {}
    return cls(loss=loss, logits=None, **extra, **fields)


def _check_loss_options(options: dict) -> None:
    unknown = set(options) - set(LOSS_OPTIONS)
    if unknown:
        raise ValueError(f"unknown loss options {sorted(unknown)}; choose from {list(LOSS_OPTIONS)}")
