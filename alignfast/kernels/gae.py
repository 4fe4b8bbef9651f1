"""Generalised Advantage Estimation as a Triton reverse scan: one program per sequence.

Kernel and launcher only; `alignfast.losses.gae` validates the inputs and picks the backend.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from alignfast.kernels.launch_device import on_tensor_device


@triton.jit
def _gae_reverse_scan_kernel(
    rewards_ptr,  # [B, T] rewards r_t, contiguous, any float dtype
    values_ptr,  # [B, T] value estimates V_t, contiguous, any float dtype
    mask_ptr,  # [B, T] int8, 1 where token t is a valid action, 0 where it is skipped; contiguous
    coef_ptr,  # [2] (γ, γ·λ) in the accumulation dtype
    adv_ptr,  # [B, T] out: advantages A_t, 0 at masked positions; contiguous, accumulation dtype
    ret_ptr,  # [B, T] out: returns A_t + V_t, 0 at masked positions; contiguous, accumulation dtype
    T,  # sequence length
    ACC: tl.constexpr,  # accumulation dtype: tl.float32, or tl.float64 for float64 inputs
):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    gamma = tl.load(coef_ptr)
    gamma_lam = tl.load(coef_ptr + 1)
    # Walking t from T-1 down to 0, over valid positions only (masked ones are skipped, not zeroed):
    #   δ_t = r_t + γ·V_next − V_t,    A_t = δ_t + γλ·A_next
    # where V_next / A_next are the value / advantage of the next *valid* position (0 past the last one).
    next_value = tl.full((), 0.0, ACC)
    next_adv = tl.full((), 0.0, ACC)
    for i in range(T):
        t = T - 1 - i
        valid = tl.load(mask_ptr + base + t) != 0
        r = tl.load(rewards_ptr + base + t).to(ACC)
        v = tl.load(values_ptr + base + t).to(ACC)
        adv = r + gamma * next_value - v + gamma_lam * next_adv
        next_adv = tl.where(valid, adv, next_adv)
        next_value = tl.where(valid, v, next_value)
        tl.store(adv_ptr + base + t, tl.where(valid, adv, 0.0).to(ACC))
        tl.store(ret_ptr + base + t, tl.where(valid, adv + v, 0.0).to(ACC))


@on_tensor_device
def gae_reverse_scan(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                     lam: float, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch one program per row of rewards/values/mask [B, T]; returns (advantages, returns) [B, T] in out_dtype.

    out_dtype is torch.float32 or torch.float64 (the accumulation dtype). Inputs are assumed validated.
    """
    B, T = rewards.shape
    rewards, values = rewards.contiguous(), values.contiguous()
    mask = mask.to(torch.int8).contiguous()
    coef = torch.tensor([gamma, gamma * lam], dtype=out_dtype, device=rewards.device)
    advantages = torch.empty((B, T), dtype=out_dtype, device=rewards.device)
    returns = torch.empty((B, T), dtype=out_dtype, device=rewards.device)
    if B == 0 or T == 0:
        return advantages, returns
    acc = tl.float64 if out_dtype == torch.float64 else tl.float32
    _gae_reverse_scan_kernel[(B,)](rewards, values, mask, coef, advantages, returns, T, ACC=acc)
    return advantages, returns
