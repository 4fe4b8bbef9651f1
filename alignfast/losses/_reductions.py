"""Masked reductions of per-token losses [B, T], shared by PPO and GRPO.

All-masked inputs never divide by zero: every count is clamped at 1, so an all-masked
sequence (or batch), or an empty batch, contributes 0 instead of NaN.
"""
from __future__ import annotations

import torch

# Aggregation modes of a per-token loss matrix, as verl and OpenRLHF name them.
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ x·m / max(Σ m, 1) over every element (a 0-dim tensor)."""
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def batch_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the leading (batch) dimension's entries; 0 for an empty batch."""
    return x.sum() / max(x.numel(), 1)


def masked_row_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B]: Σ_t x·m / max(Σ_t m, 1) per row."""
    return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar.

    - ``token-mean``:          Σ_{b,t} l·m / Σ_{b,t} m            (every token weighs the same)
    - ``seq-mean-token-sum``:  mean_b Σ_t l·m                     (every sequence weighs the same, tokens summed)
    - ``seq-mean-token-mean``: mean_b (Σ_t l·m / Σ_t m)           (every sequence weighs the same, tokens averaged)

    The batch mean of the ``seq-mean-*`` modes runs over all B rows, all-masked ones included (they add 0).
    """
    if mode == "token-mean":
        return masked_mean(per_token, mask)
    if mode == "seq-mean-token-sum":
        return batch_mean((per_token * mask).sum(-1))
    if mode == "seq-mean-token-mean":
        return batch_mean(masked_row_mean(per_token, mask))
    raise ValueError(f"loss_agg={mode!r} is unknown; valid values are {list(LOSS_AGG_MODES)}")
