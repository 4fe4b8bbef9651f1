"""TRL's `SFTTrainer` with alignfast's fused log-probs: `use_alignfast(trainer)` or `AlignfastSFTTrainer`.

Supported: TRL >= 1.16, < 2 (tested with 1.16.0). In that range `SFTTrainer` already avoids the
logits: it puts a "fused LM head" on the model (`trl.trainer.utils.add_fused_lm_head`), and its
`compute_loss` calls `model(**inputs, fused_lm_head=True)` and builds the loss from the returned
per-token `log_probs` (its `entropy` and `is_top1` feed the logged metrics). That call is the one
seam alignfast replaces: the model's forward answers `fused_lm_head=True` with the same
`FusedCausalLMOutput`, its log-probs and entropies computed by `alignfast.linear_logprobs` from
the backbone's hidden states and the output head of `alignfast.integrations.transformers`
(softcaps and logit scales from its quirks table). Everything else of TRL is untouched: data,
collation, loss types ("nll", "dft"), normalisation by `num_items_in_batch`, the MoE aux loss,
metrics. `is_top1` (for `mean_token_accuracy`) is a no-grad argmax over vocab blocks of the
trainable positions.

    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    use_alignfast(trainer, backend="auto")      # or AlignfastSFTTrainer(...)
    trainer.train()
    revert(trainer)                              # TRL's own fused head again

Not covered: label smoothing and `compute_loss_func` (TRL computes those from full logits
and only uses the fused call for metrics, which this still serves), Ulysses sequence parallelism
(its loss comes from the model's own forward), a temperature other than 1.
"""
from __future__ import annotations

import types

import torch
import trl
from trl import SFTTrainer

from alignfast.integrations.transformers import (
    _call_backbone, _router_aux_loss, backbone, output_head, unwrap)
from alignfast.ops.logprobs import linear_logprobs

__all__ = ["AlignfastSFTTrainer", "use_alignfast", "revert", "SUPPORTED_TRL"]

SUPPORTED_TRL = ">=1.16,<2"
_STATE = "_alignfast_trl_previous_forward"
_OPTIONS = ("backend", "chunk_size")
_TOP1_ROWS = 1024  # rows per no-grad argmax block


def use_alignfast(trainer: SFTTrainer, **options) -> SFTTrainer:
    """Serve `trainer`'s fused-LM-head calls with alignfast's kernels; returns `trainer`.

    `options`: backend, chunk_size of `linear_logprobs`. Undo with `revert(trainer)`.
    """
    if not isinstance(trainer, SFTTrainer):
        raise TypeError(f"use_alignfast supports trl.SFTTrainer, got {type(trainer).__name__}")
    unknown = set(options) - set(_OPTIONS)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}; choose from {list(_OPTIONS)}")
    major = int(trl.__version__.split(".")[0])
    if major != 1:
        raise RuntimeError(f"alignfast.integrations.trl supports TRL {SUPPORTED_TRL}, "
                           f"found {trl.__version__}")
    model = unwrap(trainer.model)
    previous = model.__dict__.get("forward")
    if previous is None:
        raise RuntimeError("the model has no fused LM head from SFTTrainer (trl.add_fused_lm_head); "
                           f"alignfast supports TRL {SUPPORTED_TRL}")
    output_head(model)
    backbone(model)
    if _STATE in model.__dict__:  # applied already: keep TRL's forward, replace the options
        previous = model.__dict__[_STATE]
    setattr(model, _STATE, previous)
    model._alignfast_trl_options = dict(options)
    model.forward = types.MethodType(_fused_lm_head_forward, model)
    return trainer


def revert(trainer: SFTTrainer) -> SFTTrainer:
    """TRL's own fused LM head again (the forward `use_alignfast` found). No-op if not applied."""
    model = unwrap(trainer.model)
    previous = model.__dict__.pop(_STATE, None)
    if previous is not None:
        model.forward = previous
        del model._alignfast_trl_options
    return trainer


class AlignfastSFTTrainer(SFTTrainer):
    """`trl.SFTTrainer` whose log-probs come from alignfast. Extra keyword: `alignfast_options` (dict)."""

    def __init__(self, *args, alignfast_options: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        use_alignfast(self, **(alignfast_options or {}))


def _fused_lm_head_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None,
                           num_items_in_batch=None, **kwargs):
    """TRL's `fused_lm_head=True` contract (`FusedCausalLMOutput`), computed by alignfast."""
    previous = self.__dict__[_STATE]
    if not fused_lm_head:
        return previous(*args, labels=labels, shift_labels=shift_labels,
                        num_items_in_batch=num_items_in_batch, fused_lm_head=False, **kwargs)
    if args:
        raise TypeError("alignfast: pass the model's inputs by keyword with fused_lm_head=True")
    from trl.trainer.utils import FusedCausalLMOutput

    text_config = self.config.get_text_config()
    kwargs["use_cache"] = False
    if getattr(text_config, "output_router_logits", False):
        kwargs.setdefault("output_router_logits", True)
    out = _call_backbone(self, kwargs)
    hidden = out[0]
    if shift_labels is None:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    else:
        labels = shift_labels
    head = output_head(self)
    weight, bias = head.weight, head.bias
    hidden, labels = hidden.to(weight.device), labels.to(weight.device)
    if head.scale != 1.0:
        hidden = hidden * head.scale
        bias = None if bias is None else bias * head.scale
    mask = labels != -100
    lp = linear_logprobs(hidden, weight, labels, bias, softcap=head.softcap, ignore_index=-100,
                         return_entropy=True, **self._alignfast_trl_options)
    log_probs = lp.logprobs.masked_fill(~mask, 0.0)
    entropy = lp.entropy.masked_fill(~mask, 0.0)
    detached_bias = None if bias is None else bias.detach()
    is_top1 = _is_top1(hidden.detach(), weight.detach(), detached_bias, labels, mask)
    loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
    aux_loss = None
    if kwargs.get("output_router_logits"):
        aux_loss = _router_aux_loss(self, out, kwargs.get("attention_mask"))
        loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, is_top1=is_top1,
                               label_mask=mask, aux_loss=aux_loss)


@torch.no_grad()
def _is_top1(hidden, weight, bias, labels, mask):
    """Whether the label is the (first) argmax of the logits, at the trainable positions; blocks of rows.

    softcap·tanh(z/softcap) is monotonic, so the argmax of z (no softcap needed) is that of the logits.
    """
    is_top1 = torch.zeros_like(mask)
    rows = mask.nonzero(as_tuple=True)
    flat_h, flat_t = hidden[rows], labels[rows]
    hits = torch.empty_like(flat_t, dtype=torch.bool)
    for start in range(0, flat_h.shape[0], _TOP1_ROWS):
        logits = torch.nn.functional.linear(flat_h[start:start + _TOP1_ROWS], weight, bias)
        hits[start:start + _TOP1_ROWS] = logits.argmax(-1) == flat_t[start:start + _TOP1_ROWS]
    is_top1[rows] = hits
    return is_top1
