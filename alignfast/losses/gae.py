"""Generalised Advantage Estimation (GAE) for PPO.

Schulman et al., "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
ICLR 2016, https://arxiv.org/abs/1506.02438:

    δ_t = r_t + γ·V_{t+1} − V_t
    A_t = δ_t + γλ·A_{t+1}          (A past the end = 0, V past the last valid token = 0)
    R_t = A_t + V_t                  (the value target)

Positions where `mask` is 0 are skipped: they contribute nothing, the recursion carries V and A
across them from the next valid token (so a mask with holes, e.g. tool-output tokens inside a
response, behaves like verl's `compute_gae_advantage_return`), and both outputs are 0 there.
For an ordinary right-padded mask this is the textbook recursion cut at the last valid token.

GAE has no gradient: its inputs are detached rollout tensors (rewards and value predictions of the
rollout) and its outputs are targets, so both paths compute under `torch.no_grad()` and return
tensors that do not require grad. Whitening the advantages is the caller's step.
"""
from __future__ import annotations

import torch

from alignfast import dispatch
from alignfast.losses._validation import check_choice, check_finite, check_floats, check_mask, compute_dtype

GAE_BACKENDS = ("auto", "torch", "triton", "cpp", "cuda")


def _gae_torch(rewards: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, gamma: float, lam: float,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Reverse loop over T, vectorised over B. rewards/values [B, T], valid [B, T] bool."""
    B, T = rewards.shape
    rewards, values = rewards.to(dtype), values.to(dtype)
    zero = rewards.new_zeros(B)
    next_value, next_adv = zero, zero
    advantages = torch.empty((B, T), dtype=dtype, device=rewards.device)
    for t in range(T - 1, -1, -1):
        v, m = values[:, t], valid[:, t]
        adv = rewards[:, t] + gamma * next_value - v + gamma * lam * next_adv
        next_adv = torch.where(m, adv, next_adv)
        next_value = torch.where(m, v, next_value)
        advantages[:, t] = torch.where(m, adv, zero)
    returns = torch.where(valid, advantages + values, torch.zeros_like(advantages))
    return advantages, returns


def _has_native_scan(device: torch.device) -> bool:
    from alignfast import _native

    return (_native.extension() is not None and device.type in ("cpu", "cuda")
            and torch._C._dispatch_has_kernel_for_dispatch_key("alignfast::gae_scan", device.type.upper()))


def _resolve(backend: str, device: torch.device) -> str:
    check_choice("backend", backend, GAE_BACKENDS)
    triton_ok = "triton" in dispatch.backends(device)
    native_ok = (backend in ("auto", "cpp", "cuda")) and _has_native_scan(device)
    if backend == "auto":
        if device.type == "cuda" and triton_ok:
            return "triton"
        return "cpp" if native_ok else "torch"
    if backend == "triton" and not triton_ok:
        raise RuntimeError(f"backend='triton' is not available for {device.type} tensors here (Triton runs on "
                           "CUDA, or on CPU only with TRITON_INTERPRET=1); use backend='torch' or 'auto'")
    if backend in ("cpp", "cuda") and (not native_ok or device.type != {"cpp": "cpu", "cuda": "cuda"}[backend]):
        raise RuntimeError(f"backend={backend!r} is not available for {device.type} tensors here "
                           "(alignfast._C's gae_scan is not built for it); use backend='torch' or 'auto'")
    return backend


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns by GAE(γ, λ), scanning each sequence backwards.

    Args:
        rewards: [B, T] per-token rewards r_t (e.g. the score on the last token minus a KL penalty).
        values: [B, T] value predictions V_t of the rollout.
        mask: [B, T] bool/int/float, nonzero on the tokens that are actions (the response tokens).
        gamma: discount γ ∈ [0, 1].
        lam: GAE λ ∈ [0, 1].
        backend: ``"auto"`` (the Triton kernel for CUDA tensors; on CPU alignfast._C's scan when
            built, else the torch loop), ``"torch"``, ``"triton"`` (CUDA; CPU only under
            ``TRITON_INTERPRET=1``), ``"cpp"`` or ``"cuda"`` (alignfast._C's ``gae_scan``).

    Returns:
        (advantages [B, T], returns [B, T]), float32 (float64 for float64 inputs), 0 at masked
        positions, without gradient. A fully masked row gives all zeros.
    """
    check_floats({"rewards": rewards, "values": values}, ndim=2)
    check_mask(mask, rewards, like_name="rewards")
    check_finite("gamma", gamma)
    check_finite("lam", lam)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma!r}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam!r}")
    dtype = compute_dtype(rewards, values)
    resolved = _resolve(backend, rewards.device)
    with torch.no_grad():
        rewards, values, valid = rewards.detach(), values.detach(), mask.detach() != 0
        if resolved == "triton":
            from alignfast.kernels.gae import gae_reverse_scan

            return gae_reverse_scan(rewards, values, valid, float(gamma), float(lam), dtype)
        if resolved in ("cpp", "cuda"):
            return torch.ops.alignfast.gae_scan(rewards.to(dtype).contiguous(), values.to(dtype).contiguous(),
                                                valid.contiguous(), float(gamma), float(lam))
        return _gae_torch(rewards, values, valid, float(gamma), float(lam), dtype)
