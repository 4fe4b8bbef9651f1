"""Overflow-safe exponentials of the preference losses' scores.

Sequence log-ratios reach hundreds of nats in long runs (DPO drives the rejected completions' down), so
exp(±u) of them overflows: an infinite score, then an inf − inf or 0·inf NaN in the loss or its gradient.
"""
from __future__ import annotations

import torch


def exp_bound(dtype: torch.dtype) -> float:
    """The largest argument whose exp stays finite with room to spare: 80 in float32 (as TRL's alpha
    divergence clamps), 700 in float64."""
    return 700.0 if dtype == torch.float64 else 80.0


def capped_expm1(x: torch.Tensor) -> torch.Tensor:
    """expm1(x) with x clamped at `exp_bound`: finite, and without gradient where it saturates."""
    return torch.expm1(x.clamp(max=exp_bound(x.dtype)))
