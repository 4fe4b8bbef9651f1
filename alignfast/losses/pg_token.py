"""The per-token arithmetic of PPO and GRPO in one fused elementwise pass, on four backends.

Per token, with ρ = exp(log π − log π_old) (ρ = 1 on-policy), advantage A, lo = 1 − ε_low,
hi = 1 + ε_high and the optional KL term k_t (k1/k2/k3 of `token_kl`, weighted by β):

    l_t = max(−A·ρ, −A·clip(ρ, lo, hi))          (PPO's clipped surrogate = −GRPO's min(ρA, clip(ρ)A))
    l_t = min(l_t, −c·A)  for A < 0              (dual clip, c > 1)
    l_t += β·k_t

`pg_token_terms` returns l_t [B, T] (differentiable w.r.t. logp) and the per-token metric terms
(ρ, ρ − 1 − log ρ, k_t, and the clip indicators as bits of `flags`); the reductions (loss_agg
modes, GRPO's normalisers, the metric means) stay in PyTorch in ppo.py / grpo.py. Every output is
0 where the mask is 0, whatever the inputs hold there.

Backends (`backend=`):

    torch   the formula in PyTorch ops, differentiated by autograd: the reference the kernels match
    triton  alignfast/kernels/pg_token_loss.py (CUDA; CPU only under TRITON_INTERPRET=1)
    cpp     torch.ops.alignfast.pg_token_loss on CPU (csrc/pg_token_loss_cpu.cpp)
    cuda    the same op on CUDA (csrc/cuda/pg_token_loss.cu)
    auto    CUDA tensors: triton, else cuda when built; CPU tensors: cpp when built, else torch

The kernels write ∂l_t/∂logp_t in the same pass; `PGTokenFunction`'s backward only multiplies it
by the upstream gradient, so no autograd graph is built through the arithmetic. Both kernels are
`torch.library` ops with fake implementations, so `torch.compile` traces through them.
Where the two branches tie exactly (ρ on a clip boundary) every backend takes the unclipped
branch's gradient −A·ρ, as autograd does through `torch.maximum` + `clamp`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from alignfast import _native, dispatch
from alignfast.losses._reductions import masked_mean
from alignfast.losses._validation import check_choice
from alignfast.losses.kl import token_kl
from alignfast.ops.first_order import first_order

PG_TOKEN_BACKENDS = ("auto", "torch", "triton", "cpp", "cuda")
NATIVE_OP = "alignfast::pg_token_loss"
TRITON_OP = "alignfast::pg_token_loss_triton"

# Bits of TokenTerms.flags (the same in alignfast/kernels/pg_token_loss.py and csrc/pg_token_loss.h).
CLIPPED = 1       # −A·clip(ρ) > −A·ρ: the clipped branch is the loss (PPO's clipfrac)
CLIP_LOW = 2      # ρ < 1 − ε_low and A < 0 (TRL's clip_ratio/low)
CLIP_HIGH = 4     # ρ > 1 + ε_high and A > 0 (TRL's clip_ratio/high)
DUAL_CLIPPED = 8  # A < 0 and the dual-clip bound −c·A replaced the loss


@dataclass(frozen=True)
class TokenLossOptions:
    """The non-tensor options of the token pass, as they travel through autograd."""

    ratio_low: float                       # 1 − ε_low
    ratio_high: float                      # 1 + ε_high
    dual_clip: float | None = None         # c > 1, or None
    log_ratio_clamp: float | None = None   # clamp log ρ to [−C, C] before the exp (PPO), or None (GRPO)
    kl_estimator: str | None = None        # "k1" | "k2" | "k3": the KL term when ref_logp is given
    kl_coef: float = 0.0                   # β
    backend: str = "torch"                 # a resolved backend (never "auto")


class TokenTerms(NamedTuple):
    """Per-token results, each [B, T] in the compute dtype and 0 at masked positions."""

    loss: torch.Tensor              # l_t, differentiable w.r.t. logp
    ratio: torch.Tensor             # ρ_t
    approx_kl: torch.Tensor         # ρ_t − 1 − log ρ_t (the k3 estimate of KL(π_old‖π))
    kl: torch.Tensor | None         # k_t, None without ref_logp
    flags: torch.Tensor             # uint8 bits CLIPPED | CLIP_LOW | CLIP_HIGH | DUAL_CLIPPED

    def flag_mean(self, bit: int, mask: torch.Tensor) -> torch.Tensor:
        """Masked token mean of one indicator bit (a detached 0-dim tensor in the compute dtype)."""
        return masked_mean(((self.flags & bit) != 0).to(self.ratio.dtype), mask).detach()


# ---------------------------------------------------------------------------------------------
# torch: the formula in PyTorch ops (the reference)
# ---------------------------------------------------------------------------------------------
def _terms_torch(logp, old, ref, adv, valid, o: TokenLossOptions) -> TokenTerms:
    zero = logp.new_zeros(())
    # Masked positions compute on zeros: padding that holds −inf or NaN cannot reach a loss or a gradient.
    lp = torch.where(valid, logp, zero)
    a = torch.where(valid, adv if adv.dim() == 2 else adv[:, None], zero)
    log_ratio = lp - (lp.detach() if old is None else torch.where(valid, old, zero))
    if o.log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-o.log_ratio_clamp, o.log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    unclipped = -a * ratio
    clipped = -a * ratio.clamp(o.ratio_low, o.ratio_high)
    loss = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        flags = ((clipped > unclipped).to(torch.uint8) * CLIPPED
                 | ((ratio < o.ratio_low) & (a < 0)).to(torch.uint8) * CLIP_LOW
                 | ((ratio > o.ratio_high) & (a > 0)).to(torch.uint8) * CLIP_HIGH)
    if o.dual_clip is not None:
        bound = -a * o.dual_clip
        negative = a < 0
        flags = flags | (negative & (loss > bound)).to(torch.uint8) * DUAL_CLIPPED
        loss = torch.where(negative, torch.minimum(loss, bound), loss)
    kl = None
    if ref is not None:
        kl = token_kl(lp, torch.where(valid, ref, zero), o.kl_estimator)
        if o.kl_coef:
            loss = loss + o.kl_coef * kl
        kl = torch.where(valid, kl.detach(), zero)
    with torch.no_grad():
        lr = log_ratio.detach()
        approx_kl = torch.where(valid, torch.expm1(lr) - lr, zero)
        flags = torch.where(valid, flags, 0)
    return TokenTerms(torch.where(valid, loss, zero), torch.where(valid, ratio.detach(), zero), approx_kl, kl,
                      flags)


# ---------------------------------------------------------------------------------------------
# triton / cpp / cuda: one fused pass that also writes ∂l/∂logp
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op(TRITON_OP, mutates_args=())
def _triton_op(logp: torch.Tensor, old: torch.Tensor | None, ref: torch.Tensor | None, adv: torch.Tensor,
               valid: torch.Tensor, ratio_low: float, ratio_high: float, dual_clip: float | None,
               log_ratio_clamp: float | None, kl_estimator: str | None, kl_coef: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from alignfast.kernels.pg_token_loss import pg_token_loss

    return pg_token_loss(logp, old, ref, adv, valid, ratio_low, ratio_high, dual_clip, log_ratio_clamp,
                         kl_estimator, kl_coef)


def _fake(logp, old, ref, adv, valid, ratio_low, ratio_high, dual_clip, log_ratio_clamp, kl_estimator, kl_coef):
    like = [torch.empty_like(logp) for _ in range(4)]
    kl = torch.empty_like(logp) if ref is not None else logp.new_empty(0)
    return (*like, kl, torch.empty_like(logp, dtype=torch.uint8))


_triton_op.register_fake(_fake)
_native.no_derivative(TRITON_OP, "alignfast.losses.pg_token_terms")


def _native_available() -> bool:
    return _native.extension() is not None and hasattr(torch.ops.alignfast, "pg_token_loss")


if _native_available():  # once, at import, as the row kernels' fakes
    torch.library.register_fake(NATIVE_OP)(_fake)
    _native.no_derivative(NATIVE_OP, "alignfast.losses.pg_token_terms")


def _has_native(device: torch.device) -> bool:
    return (device.type in ("cpu", "cuda") and _native_available()
            and torch._C._dispatch_has_kernel_for_dispatch_key(NATIVE_OP, device.type.upper()))


def _launch(logp, old, ref, adv, valid, o: TokenLossOptions):
    op = torch.ops.alignfast.pg_token_loss_triton if o.backend == "triton" else torch.ops.alignfast.pg_token_loss
    return op(logp, old, ref, adv, valid, o.ratio_low, o.ratio_high, o.dual_clip, o.log_ratio_clamp,
              o.kl_estimator if ref is not None else None, o.kl_coef)


class PGTokenFunction(torch.autograd.Function):
    """(logp [B, T], old [B, T] | None, ref [B, T] | None, adv [B, T] | [B], valid [B, T] bool, opts)
    -> (loss, ratio, approx_kl, kl, flags); only `loss` is differentiable, and only w.r.t. logp
    (old, ref and the advantages are rollout constants)."""

    @staticmethod
    def forward(ctx, logp, old, ref, adv, valid, opts: TokenLossOptions):
        ctx.set_materialize_grads(False)
        loss, dloss, ratio, approx_kl, kl, flags = _launch(logp, old, ref, adv, valid, opts)
        ctx.save_for_backward(dloss)
        ctx.mark_non_differentiable(ratio, approx_kl, kl, flags)
        return loss, ratio, approx_kl, kl, flags

    @staticmethod
    @first_order
    def backward(ctx, grad_loss, *_):
        (dloss,) = ctx.saved_tensors
        grad = None if grad_loss is None or not ctx.needs_input_grad[0] else grad_loss * dloss
        return grad, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# dispatch and the entry point
# ---------------------------------------------------------------------------------------------
def resolve_backend(backend: str, device: torch.device) -> str:
    """A concrete backend of the token pass for tensors on `device` (see the module docstring)."""
    check_choice("backend", backend, PG_TOKEN_BACKENDS)
    triton_ok = "triton" in dispatch.backends(device)
    native_ok = _has_native(device)
    if backend == "auto":
        if device.type == "cuda":
            return "triton" if triton_ok else ("cuda" if native_ok else "torch")
        return "cpp" if native_ok and device.type == "cpu" else "torch"
    if backend == "triton" and not triton_ok:
        raise RuntimeError(f"backend='triton' is not available for {device.type} tensors here (Triton runs on "
                           "CUDA, or on CPU only with TRITON_INTERPRET=1); use backend='torch' or 'auto'")
    if backend in ("cpp", "cuda") and (not native_ok or device.type != {"cpp": "cpu", "cuda": "cuda"}[backend]):
        raise RuntimeError(f"backend={backend!r} is not available for {device.type} tensors here "
                           "(alignfast._C's pg_token_loss is not built for it); use backend='torch' or 'auto'")
    return backend


def pg_token_terms(logp: torch.Tensor, old: torch.Tensor | None, ref: torch.Tensor | None, adv: torch.Tensor,
                   mask: torch.Tensor, opts: TokenLossOptions) -> TokenTerms:
    """The token pass for validated input, all float tensors already in the compute dtype.

    logp [B, T] (differentiable), old/ref [B, T] or None (treated as constants), adv [B, T] or [B],
    mask [B, T] (nonzero: the token counts), opts with a resolved backend.
    """
    valid = mask != 0
    old = None if old is None else old.detach()
    ref = None if ref is None else ref.detach()
    adv = adv.detach()
    if opts.backend == "torch":
        return _terms_torch(logp, old, ref, adv, valid, opts)
    loss, ratio, approx_kl, kl, flags = PGTokenFunction.apply(logp, old, ref, adv, valid, opts)
    return TokenTerms(loss, ratio, approx_kl, kl if ref is not None else None, flags)
