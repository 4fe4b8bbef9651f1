"""Other projects' implementations of the ops, imported lazily (each only in its own case's process).

Each adapter takes the same keyword inputs as the op's naive function and returns the same output.
"""
from __future__ import annotations

import torch

# the package each adapter needs: its absence is a "skipped" row, not an error
PACKAGES = {"liger": "liger_kernel", "trl": "trl", "cce": "cut_cross_entropy"}

# TRL's default vocab tile (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16)
TRL_VOCAB_CHUNK = 32768


def liger_cross_entropy(hidden, weight, targets):
    """Liger-Kernel's fused linear cross-entropy (Triton; the gradient is formed in the forward)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss()(weight, hidden, targets)


def trl_logprobs(hidden, weight, targets):
    """TRL's ChunkedLogProbFunction: cuBLAS/BLAS tiles, online logsumexp, recompute in backward."""
    from trl.kernels import ChunkedLogProbFunction

    return ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, TRL_VOCAB_CHUNK, None, 1.0, ())[0]


def trl_cross_entropy(hidden, weight, targets):
    """TRL's fused-lm-head SFT loss: the mean negative chunked log-prob (all targets valid here)."""
    return -trl_logprobs(hidden, weight, targets).mean()


def cce_cross_entropy(hidden, weight, targets):
    """Apple's Cut Cross-Entropy."""
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(hidden, weight, targets)


def cce_logprobs(hidden, weight, targets) -> torch.Tensor:
    """Cut Cross-Entropy per token (reduction="none"), negated into log-probs."""
    from cut_cross_entropy import linear_cross_entropy

    return -linear_cross_entropy(hidden, weight, targets, reduction="none")
