"""Fused ops: one file per op (reference, chunked path, autograd Function, dispatch)."""
from alignfast.ops.cross_entropy import linear_cross_entropy
from alignfast.ops.kl import linear_kl
from alignfast.ops.logprobs import LogProbs, linear_logprobs

__all__ = ["LogProbs", "linear_cross_entropy", "linear_kl", "linear_logprobs"]
