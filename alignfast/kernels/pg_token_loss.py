"""PPO/GRPO per-token loss, its derivative and metric terms in one elementwise pass (Triton).

Kernel and launcher only; `alignfast.losses.pg_token` validates the inputs, picks the backend
and wraps the launcher as a custom op and an autograd Function.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from alignfast.kernels.launch_device import on_tensor_device

BLOCK = 1024

# Bits of the `flags` output (same values as csrc/pg_token_loss.h and alignfast.losses.pg_token).
CLIPPED, CLIP_LOW, CLIP_HIGH, DUAL_CLIPPED = 1, 2, 4, 8
# The kernel's copies: a compiled kernel reads only constexpr globals (the interpreter reads any).
_CLIPPED, _CLIP_LOW, _CLIP_HIGH, _DUAL_CLIPPED = (tl.constexpr(b) for b in (CLIPPED, CLIP_LOW, CLIP_HIGH,
                                                                           DUAL_CLIPPED))
KL_CODES = {None: 0, "k1": 1, "k2": 2, "k3": 3}


@triton.jit
def _expm1(x):
    # exp(x) − 1 without the cancellation near 0 (Kahan: (u − 1)·x / log u with u = exp(x), exact
    # when u rounds to 1); away from 0 there is nothing to cancel and u − 1 is accurate.
    u = tl.exp(x)
    um1 = u - 1.0
    small = tl.abs(x) < 0.5
    safe_log = tl.log(tl.where(small & (u != 1.0), u, 2.0))
    kahan = tl.where(u == 1.0, x, um1 * x / safe_log)
    return tl.where(small, kahan, um1)


# Per token t (all in ACC; every output is 0 where valid_t = 0):
#   lr  = logp − old                       (0 when on-policy: ρ = 1 with ∂ρ/∂logp = 1)
#   lr  = clamp(lr, −C, C) when CLAMP      (∂lr/∂logp = 1 inside [−C, C], 0 outside)
#   ρ   = exp(lr)
#   u   = −A·ρ,   c = −A·clip(ρ, lo, hi)   (lo = 1 − ε_low, hi = 1 + ε_high)
#   l   = max(u, c);   ∂l/∂logp = 0 if c > u (the clipped branch wins strictly), else −A·ρ·∂lr/∂logp
#   dual clip (A < 0 and l > −c_d·A):  l = −c_d·A,  ∂l/∂logp = 0
#   KL term, x = ref − logp:  k1 = −x (∂ = 1),  k2 = x²/2 (∂ = −x),  k3 = eˣ − 1 − x (∂ = −(eˣ − 1))
#   l += β·k,  ∂l/∂logp += β·∂k      (only when β ≠ 0, so an overflowing k with β = 0 cannot give NaN)
#   approx_kl = ρ − 1 − lr;  flags = CLIPPED·[c > u] | CLIP_LOW·[ρ < lo, A < 0] | CLIP_HIGH·[ρ > hi, A > 0]
#                                    | DUAL_CLIPPED·[dual clip applied]
@triton.jit
def _pg_token_loss_kernel(
    logp_ptr,  # [N] log π(a_t) of the policy, N = B·T row-major, ACC dtype
    old_ptr,  # [N] log π_old(a_t), ACC; not read unless HAS_OLD
    ref_ptr,  # [N] log π_ref(a_t), ACC; not read unless HAS_REF
    adv_ptr,  # [N] per-token advantages A_t, or [B] one per row when ADV_PER_ROW; ACC
    valid_ptr,  # [N] int8, nonzero where the token counts
    coef_ptr,  # [5] ACC: (lo, hi, dual-clip constant c_d, KL coefficient β, log-ratio clamp C)
    loss_ptr,  # [N] out: l_t, ACC
    dloss_ptr,  # [N] out: ∂l_t/∂logp_t, ACC
    ratio_ptr,  # [N] out: ρ_t, ACC
    akl_ptr,  # [N] out: ρ_t − 1 − log ρ_t (the approx_kl term), ACC
    kl_ptr,  # [N] out: the KL estimator term k_t, ACC; not written unless HAS_REF
    flags_ptr,  # [N] out: uint8 bit set (CLIPPED, CLIP_LOW, CLIP_HIGH, DUAL_CLIPPED)
    N,  # B·T
    T,  # tokens per row (the row of a per-row advantage is offset // T)
    HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr,
    ADV_PER_ROW: tl.constexpr,
    DUAL_CLIP: tl.constexpr,
    CLAMP: tl.constexpr,
    KL_EST: tl.constexpr,  # 1: k1, 2: k2, 3: k3 (used when HAS_REF)
    ACC: tl.constexpr,  # tl.float32, or tl.float64 for float64 inputs
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    valid = (tl.load(valid_ptr + offs, mask=inb, other=0) != 0) & inb
    lo = tl.load(coef_ptr)
    hi = tl.load(coef_ptr + 1)
    beta = tl.load(coef_ptr + 3)
    zero = tl.zeros((BLOCK,), ACC)
    # Invalid lanes compute on zeros, so whatever padding holds (−inf, NaN) cannot leak into a NaN.
    logp = tl.where(valid, tl.load(logp_ptr + offs, mask=valid, other=0.0).to(ACC), zero)
    if ADV_PER_ROW:
        adv = tl.load(adv_ptr + offs // T, mask=valid, other=0.0).to(ACC)
    else:
        adv = tl.load(adv_ptr + offs, mask=valid, other=0.0).to(ACC)
    adv = tl.where(valid, adv, zero)

    if HAS_OLD:
        old = tl.where(valid, tl.load(old_ptr + offs, mask=valid, other=0.0).to(ACC), zero)
        log_ratio = logp - old
    else:
        log_ratio = zero
    dlr = zero + 1.0
    if CLAMP:
        bound = tl.load(coef_ptr + 4)
        dlr = tl.where(tl.abs(log_ratio) <= bound, dlr, zero)
        log_ratio = tl.minimum(tl.maximum(log_ratio, -bound), bound)
    ratio = tl.exp(log_ratio)

    unclipped = -adv * ratio
    clipped = -adv * tl.minimum(tl.maximum(ratio, lo), hi)
    is_clipped = clipped > unclipped
    loss = tl.where(is_clipped, clipped, unclipped)
    dloss = tl.where(is_clipped, zero, unclipped * dlr)
    flags = (is_clipped.to(tl.int32) * _CLIPPED
             | ((ratio < lo) & (adv < 0)).to(tl.int32) * _CLIP_LOW
             | ((ratio > hi) & (adv > 0)).to(tl.int32) * _CLIP_HIGH)
    if DUAL_CLIP:
        floor = -adv * tl.load(coef_ptr + 2)
        dual = (adv < 0) & (loss > floor)
        loss = tl.where(dual, floor, loss)
        dloss = tl.where(dual, zero, dloss)
        flags = flags | dual.to(tl.int32) * _DUAL_CLIPPED
    approx_kl = _expm1(log_ratio) - log_ratio

    if HAS_REF:
        ref = tl.where(valid, tl.load(ref_ptr + offs, mask=valid, other=0.0).to(ACC), zero)
        if KL_EST == 1:
            kl = logp - ref
            dkl = zero + 1.0
        elif KL_EST == 2:
            kl = 0.5 * (logp - ref) * (logp - ref)
            dkl = logp - ref
        else:
            e = _expm1(ref - logp)
            kl = e - (ref - logp)
            dkl = -e
        use = beta != 0.0
        loss = tl.where(use, loss + beta * kl, loss)
        dloss = tl.where(use, dloss + beta * dkl, dloss)
        tl.store(kl_ptr + offs, tl.where(valid, kl, zero), mask=inb)

    tl.store(loss_ptr + offs, tl.where(valid, loss, zero), mask=inb)
    tl.store(dloss_ptr + offs, tl.where(valid, dloss, zero), mask=inb)
    tl.store(ratio_ptr + offs, tl.where(valid, ratio, zero), mask=inb)
    tl.store(akl_ptr + offs, tl.where(valid, approx_kl, zero), mask=inb)
    tl.store(flags_ptr + offs, tl.where(valid, flags, 0).to(tl.uint8), mask=inb)


@on_tensor_device
def pg_token_loss(logp: torch.Tensor, old: torch.Tensor | None, ref: torch.Tensor | None, adv: torch.Tensor,
                  valid: torch.Tensor, ratio_low: float, ratio_high: float, dual_clip: float | None,
                  log_ratio_clamp: float | None, kl_estimator: str | None, kl_coef: float):
    """One launch over logp [B, T] (float32 or float64, the accumulation dtype; old/ref/adv in it too,
    adv [B, T] or [B]; valid [B, T] bool). Returns (loss, dloss, ratio, approx_kl, kl, flags), each
    [B, T] (kl [0] when ref is None; flags uint8). Inputs are assumed validated."""
    B, T = logp.shape
    dtype, device = logp.dtype, logp.device
    has_old, has_ref = old is not None, ref is not None
    logp, adv = logp.contiguous(), adv.contiguous()
    old = old.contiguous() if has_old else logp  # placeholders are never read (constexpr flags)
    ref_in = ref.contiguous() if has_ref else logp
    valid = valid.contiguous().view(torch.int8)
    coef = torch.tensor([ratio_low, ratio_high, dual_clip or 0.0, kl_coef, log_ratio_clamp or 0.0], dtype=dtype,
                        device=device)
    outs = [torch.empty((B, T), dtype=dtype, device=device) for _ in range(4)]
    kl = torch.empty((B, T) if has_ref else (0,), dtype=dtype, device=device)
    flags = torch.empty((B, T), dtype=torch.uint8, device=device)
    n = B * T
    if n:
        _pg_token_loss_kernel[(triton.cdiv(n, BLOCK),)](
            logp, old, ref_in, adv, valid, coef, *outs, kl if has_ref else outs[0], flags, n, T,
            HAS_OLD=has_old, HAS_REF=has_ref, ADV_PER_ROW=adv.dim() == 1,
            DUAL_CLIP=dual_clip is not None, CLAMP=log_ratio_clamp is not None, KL_EST=KL_CODES[kl_estimator],
            ACC=tl.float64 if dtype == torch.float64 else tl.float32, BLOCK=BLOCK)
    loss, dloss, ratio, approx_kl = outs
    return loss, dloss, ratio, approx_kl, kl, flags
