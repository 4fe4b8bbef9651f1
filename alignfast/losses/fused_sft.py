"""`LinearSFTLoss`: supervised fine-tuning's cross-entropy from hidden states, on the fused base.

    loss = −Σ_{t valid} log π(y_t | x, y_<t) / n_valid        (reduction="mean", TRL's SFTTrainer)
    loss = −Σ_{t valid} log π(y_t | x, y_<t)                  (reduction="sum")

The formula is a sum over tokens, so its chunks are any token ranges: 3 vocab projections on the
fused-gradient backends whatever the sequence length. (For label smoothing or a z-loss use
`alignfast.linear_cross_entropy`.)
"""
from __future__ import annotations

import torch

from alignfast.losses.fused_base import LinearLossBase, SequenceBatch

REDUCTIONS = ("mean", "sum")


class LinearSFTLoss(LinearLossBase):
    """Token-mean (or sum) negative log-likelihood of `labels` from `hidden` and `weight`.

    Args:
        reduction: "mean" over the non-ignored tokens of the batch (0 if there are none) or "sum".
        log_entropy: also log the mean entropy of the predicted distributions (TRL's "entropy";
            costs one more pass over each logits block).
        ignore_index, temperature, softcap, backend, chunk_size: as in `linear_logprobs`.

    forward(hidden [B, T, H], weight [V, H], labels [B, T], bias [V] | None)
        -> (loss, {"num_tokens", "entropy"?}), labels already shifted (labels[t] is hidden[t]'s target).

    Example:
        >>> loss, metrics = LinearSFTLoss()(torch.randn(2, 5, 16, requires_grad=True),
        ...                                 torch.randn(100, 16), torch.randint(0, 100, (2, 5)))
    """

    unit = "token"

    def __init__(self, *, reduction: str = "mean", log_entropy: bool = False, **options):
        super().__init__(**options)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction={reduction!r} is unknown; choose one of {list(REDUCTIONS)}")
        self.reduction = reduction
        self.log_entropy = log_entropy

    def formula(self, batch: SequenceBatch):
        nll = -batch.logps.sum()
        loss = nll / max(batch.total_tokens, 1) if self.reduction == "mean" else nll
        metrics = {"num_tokens": torch.tensor(float(batch.total_tokens))}
        if batch.entropy is not None:
            metrics["entropy"] = batch.entropy.sum() / max(batch.total_tokens, 1)
        return loss, metrics

    def forward(self, hidden, weight, labels, bias=None):
        return self._loss(self.formula, hidden, weight, bias, labels, with_entropy=self.log_entropy)
