"""TRL's fused-LM-head call, answered by alignfast: the one seam every adapter of this package replaces.

TRL >= 1.16 computes the per-token log-probs of SFT, DPO, KTO and GRPO through a single call,
`model(**inputs, labels=labels, fused_lm_head=True)`, which `trl.trainer.utils.add_fused_lm_head`
installs on the model instance and which returns a `FusedCausalLMOutput` (log_probs, entropy,
mean_logits, log_sum_sq_probs, is_top1, label_mask, loss, aux_loss). `install` puts a forward on the
same instance that answers that call with `alignfast`'s kernels: the backbone's hidden states and the
output head (`alignfast.integrations.transformers`, softcaps and logit scales from its quirks table)
go to `logprob_stats` (the machinery of `linear_logprobs`, which also yields the mean logit in the
same pass). Calls without `fused_lm_head=True` (generation, `return_outputs`) go to TRL's forward.

Each model gets the `HeadSpec` its trainer gave `add_fused_lm_head`: which outputs, the temperature,
whether the head runs in fp32. `is_top1` and `log_sum_sq_probs` (metrics and WPO weights, no gradient)
come from a no-grad pass over the trainable rows, in blocks of the same size as the fused pass.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
from packaging.version import Version
from torch import nn

from alignfast import dispatch
from alignfast.integrations.transformers import _call_backbone, backbone, output_head, unwrap
from alignfast.ops.chunked import logits_block
from alignfast.ops.logprobs import logprob_stats, make_options
from alignfast.ops.options import LogitOptions, compute_dtype
from alignfast.ops.validation import check_chunk_size

__all__ = ["HeadSpec", "OPTIONS", "SUPPORTED_TRL", "install", "uninstall", "is_installed", "head_outputs"]

SUPPORTED_TRL = ">=1.16,<2"
OPTIONS = ("backend", "chunk_size")  # keyword options of `use_alignfast`, passed to the fused op
OUTPUTS = ("log_probs", "entropy", "mean_logits", "log_sum_sq_probs", "is_top1")
_STATE = "_alignfast_trl"


@dataclass(frozen=True)
class HeadSpec:
    """What a trainer asked `add_fused_lm_head` for on one model (mirrors its arguments)."""

    outputs: tuple[str, ...] = ("log_probs",)
    temperature: float = 1.0
    cast_to_fp32: bool = False  # GRPO's `cast_lm_head_to_fp32`: the head and hidden states in fp32

    def __post_init__(self):
        unknown = set(self.outputs) - set(OUTPUTS)
        if unknown:
            raise ValueError(f"unknown fused-head outputs {sorted(unknown)}; choose from {list(OUTPUTS)}")


@dataclass
class _State:
    previous: Callable  # the instance forward `install` found (TRL's, maybe inside accelerate's wrapper)
    spec: HeadSpec
    options: dict
    autocast: Callable[[], Any] | None  # accelerate's mixed-precision context, when it wrapped TRL's forward
    active: bool = True


def check_options(options: dict) -> None:
    """Names and values, so a bad one fails now, not at the first step. A backend is checked by name only:
    whether it runs on the model's device is known at the first step (transformers' Trainer places the
    model there only in `train()` under DeepSpeed, FSDP or model parallelism)."""
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}; choose from {list(OPTIONS)}")
    check_chunk_size(options.get("chunk_size"))
    backend = options.get("backend", "auto")
    if not isinstance(backend, str) or backend not in ("auto", *dispatch.ALL_BACKENDS):
        raise ValueError(f"backend={backend!r} is unknown; choose 'auto' or one of {list(dispatch.ALL_BACKENDS)}")


def check_trl_version() -> None:
    import trl

    if not Version("1.16") <= Version(Version(trl.__version__).base_version) < Version("2"):
        raise RuntimeError(f"alignfast.integrations.trl supports TRL {SUPPORTED_TRL}, "
                           f"found {trl.__version__}")


def install(trainer, specs: list[tuple[nn.Module, HeadSpec]], options: dict) -> None:
    """Answer the `fused_lm_head=True` calls of each model of `trainer` with alignfast, per its spec.

    All models are checked before any is changed. Installing again replaces spec and options.
    """
    check_options(options)
    check_trl_version()
    accelerator = getattr(trainer, "accelerator", None)
    targets = []
    for model, spec in specs:
        target = unwrap(model)
        output_head(target)  # fail now, not at the first step, on an unsupported head or backbone
        backbone(target)
        targets.append((target, spec, _find_trl_forward(target)))
    for target, spec, (previous, wrapped) in targets:
        state = target.__dict__.get(_STATE)
        if state is None or state.previous is not previous:  # first time, or a new trainer's TRL forward
            autocast = accelerator.autocast if wrapped and accelerator is not None else None
            state = _State(previous, spec, dict(options), autocast)
            setattr(target, _STATE, state)
        state.spec, state.options, state.active = spec, dict(options), True
        if target.__dict__.get("forward") is state.previous:
            target.forward = types.MethodType(_make_forward(type(target).forward, state.previous), target)


def uninstall(model: nn.Module) -> None:
    """TRL's fused forward again, exactly; no-op where `install` was not applied.

    A wrapper put around ours later (accelerate's mixed precision, when `train()` prepares the model) stays,
    and our forward inside it hands every call to TRL's from now on.
    """
    target = unwrap(model)
    state = target.__dict__.get(_STATE)
    if state is None or not state.active:
        return
    state.active = False
    if _is_ours(target.__dict__.get("forward")):
        target.forward = state.previous


def is_installed(model: nn.Module) -> bool:
    state = unwrap(model).__dict__.get(_STATE)
    return state is not None and state.active


def _is_ours(forward) -> bool:
    return getattr(getattr(forward, "__func__", None), "_alignfast_trl", False)


def _is_trls(forward) -> bool:
    code = getattr(getattr(forward, "__func__", forward), "__code__", None)
    return code is not None and "fused_lm_head" in code.co_varnames


def _find_trl_forward(model: nn.Module):
    """(the instance forward to keep, whether it is accelerate's mixed-precision wrapper around TRL's).

    Ours already there (maybe inside accelerate's wrapper): the one it replaced. A model that another
    trainer prepared since (its TRL forward now on top of ours): that trainer's."""
    state = model.__dict__.get(_STATE)
    forward = model.__dict__.get("forward")
    if state is not None and (forward is state.previous or _is_ours(forward)
                              or _is_ours(model.__dict__.get("_original_forward"))):
        return state.previous, state.autocast is not None
    if _is_trls(forward):
        return forward, False
    if forward is not None and _is_trls(model.__dict__.get("_original_forward")):  # Accelerator.prepare_model
        return forward, True
    raise RuntimeError(f"{type(model).__name__} has no fused LM head from TRL (trl.trainer.utils."
                       f"add_fused_lm_head); alignfast.integrations.trl supports TRL {SUPPORTED_TRL}")


def _make_forward(class_forward, previous):
    """Our forward over `previous` (TRL's), which gets every call we do not answer. `previous` is bound
    here, not read from the state: a later trainer's TRL forward wraps this one and the state moves to it."""
    # Keep the model's signature, as TRL does: `generate` validates its keyword arguments against it.
    @functools.wraps(class_forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        state = self.__dict__[_STATE]
        if not (fused_lm_head and state.active and state.previous is previous):
            return previous(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                            num_items_in_batch=num_items_in_batch, **kwargs)
        if args:
            raise TypeError("alignfast: pass the model's inputs by keyword with fused_lm_head=True")
        with state.autocast() if state.autocast is not None else contextlib.nullcontext():
            return _fused_output(self, state, labels, shift_labels, num_items_in_batch, kwargs)
    forward.__signature__ = inspect.signature(class_forward)
    forward._alignfast_trl = True
    return forward


def _fused_output(model, state: _State, labels, shift_labels, num_items_in_batch, kwargs):
    """`FusedCausalLMOutput` as TRL defines it: per-token fields zero where the label is -100."""
    from trl.trainer.utils import FusedCausalLMOutput

    text_config = model.config.get_text_config()
    kwargs["use_cache"] = False
    if getattr(text_config, "output_router_logits", False):
        kwargs.setdefault("output_router_logits", True)
    out = _call_backbone(model, kwargs)
    hidden = out[0]
    if shift_labels is None:
        if labels is None:
            raise ValueError("alignfast: fused_lm_head=True needs labels or shift_labels")
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    else:
        labels = shift_labels
    per_token, mask = head_outputs(model, hidden, labels, state.spec, state.options)
    log_probs = per_token["log_probs"]
    loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
    aux_loss = None
    if kwargs.get("output_router_logits"):
        aux_loss = _trl_router_aux_loss(text_config, out, kwargs.get("attention_mask"))
        loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
    return FusedCausalLMOutput(loss=loss, label_mask=mask, aux_loss=aux_loss, **per_token)


def _trl_router_aux_loss(text_config, out, attention_mask):
    """The MoE load-balancing term as TRL's fused head forms it: Mixtral's `load_balancing_loss_func`
    for every MoE family, with the text config's expert counts (no attention mask when padding-free)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    experts, top_k = (getattr(text_config, k, None) for k in ("num_experts", "num_experts_per_tok"))
    if experts is None or top_k is None or getattr(out, "router_logits", None) is None:
        raise NotImplementedError(f"alignfast: the router aux loss of {type(text_config).__name__} (no num_experts "
                                  f"/ num_experts_per_tok / router logits) is not supported; set "
                                  f"output_router_logits=False")
    return load_balancing_loss_func(out.router_logits, experts, top_k, attention_mask)


def head_outputs(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, spec: HeadSpec,
                 options: dict) -> tuple[dict[str, Any], torch.Tensor]:
    """The per-token fields `spec.outputs` asks for ([B, T] each, zero at label -100) and the label mask.

    hidden: [B, T, H] aligned with labels [B, T] (already shifted).
    """
    head = output_head(model)
    weight, bias = head.weight, head.bias
    if any(hasattr(t, "device_mesh") or hasattr(t, "ds_id") for t in (weight, bias) if t is not None):
        raise NotImplementedError("alignfast.integrations.trl: the lm_head is sharded (FSDP2 DTensor or "
                                  "DeepSpeed ZeRO-3); use alignfast's own trainers for sharded heads")
    hidden, labels = hidden.to(weight.device), labels.to(weight.device)
    # Autocast would turn the vocab matmuls into low precision behind the kernels' back: the head runs
    # in the weight's dtype instead (fp32 for `cast_to_fp32`), accumulating in fp32 either way.
    with torch.autocast(weight.device.type, enabled=False):
        if spec.cast_to_fp32:
            weight, bias = weight.float(), None if bias is None else bias.float()
        hidden = hidden.to(weight.dtype)
        if head.scale != 1.0:
            hidden = hidden * head.scale
            bias = None if bias is None else bias * head.scale
        outputs = set(spec.outputs)
        opts = make_options(hidden, weight, labels, bias, temperature=spec.temperature, softcap=head.softcap,
                            ignore_index=-100, backend=options.get("backend", "auto"),
                            chunk_size=options.get("chunk_size"), with_entropy="entropy" in outputs,
                            with_zmean="mean_logits" in outputs)
        flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        st = logprob_stats(flat_h, weight, bias, flat_t, opts, -100)
        mask = flat_t != -100
        per_token = {"log_probs": st.logprob, "entropy": st.entropy,
                     "mean_logits": None if st.zmean is None else st.zmean.detach()}
        detached_bias = None if bias is None else bias.detach()
        per_token.update(_no_grad_outputs(flat_h.detach(), weight.detach(), detached_bias, flat_t, mask, opts,
                                          outputs))
    shape = labels.shape
    per_token = {k: (None if v is None else v.view(shape)) for k, v in per_token.items()}
    return per_token, mask.view(shape)


@torch.no_grad()
def _no_grad_outputs(hidden, weight, bias, labels, mask, opts: LogitOptions, outputs: set) -> dict:
    """`is_top1` (the label is the first argmax) and `log_sum_sq_probs` (log Σ_v p_v²) of the tempered
    logits x = softcap·tanh(z/softcap)/T, at the trainable rows, in blocks of the fused pass's row count."""
    want_top1, want_sq = "is_top1" in outputs, "log_sum_sq_probs" in outputs
    if not (want_top1 or want_sq):
        return {"is_top1": None, "log_sum_sq_probs": None}
    rows = mask.nonzero().squeeze(1)
    flat_h, flat_t = hidden.index_select(0, rows), labels.index_select(0, rows)
    top1 = torch.zeros_like(flat_t, dtype=torch.bool)
    sq = torch.zeros(flat_t.shape, dtype=compute_dtype(hidden.dtype), device=hidden.device)
    step = opts.chunk_rows(weight.shape[0], compute_dtype(hidden.dtype))
    for start in range(0, flat_h.shape[0], step):
        sl = slice(start, start + step)
        x = logits_block(flat_h[sl], weight, bias)
        if opts.softcap is not None:
            x = x.div_(opts.softcap).tanh_().mul_(opts.softcap)
        x = x.div_(opts.temperature)
        if want_top1:
            top1[sl] = x.argmax(dim=1) == flat_t[sl]
        if want_sq:
            lse = torch.logsumexp(x, dim=1)
            sq[sl] = torch.logsumexp(x.mul_(2.0), dim=1) - 2 * lse
    n = labels.shape[0]
    return {"is_top1": torch.zeros_like(mask).index_copy_(0, rows, top1) if want_top1 else None,
            "log_sum_sq_probs": sq.new_zeros(n).index_copy_(0, rows, sq) if want_sq else None}
