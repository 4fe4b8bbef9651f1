"""Per-sequence log-probs from a backbone-only model and the fused `linear_logprobs` (no logits).

Labels are unshifted (Hugging Face convention): token t+1 is predicted from the hidden state at t.
"""
from __future__ import annotations

import torch

from alignfast.ops import linear_logprobs
from alignfast.trainers.modeling import full_head


def shift(hidden: torch.Tensor, labels: torch.Tensor):
    """hidden [B, T, H], labels [B, T] -> the (predicting state, target) pairs: [B, T-1, H], [B, T-1]."""
    return hidden[:, :-1], labels[:, 1:]


def sequence_logps(model, input_ids, attention_mask, labels, *, backend="auto", chunk_size=None):
    """(Σ log π(y_t | x, y_<t) over the completion tokens [B] fp32, completion token counts [B])."""
    hidden, targets = shift(model(input_ids=input_ids, attention_mask=attention_mask), labels)
    with full_head(model) as head:
        out = linear_logprobs(hidden, head.weight, targets, head.bias, softcap=head.softcap, backend=backend,
                              chunk_size=chunk_size)
    return out.logprobs.sum(-1), (targets != -100).sum(-1)


def token_logps(model, input_ids, attention_mask, labels, *, temperature=1.0, return_entropy=False, backend="auto",
                chunk_size=None):
    """Per-token log-probs [B, T-1] fp32 of the shifted labels (0 where ignored), and the entropies
    when `return_entropy` (else None)."""
    hidden, targets = shift(model(input_ids=input_ids, attention_mask=attention_mask), labels)
    with full_head(model) as head:
        out = linear_logprobs(hidden, head.weight, targets, head.bias, softcap=head.softcap, temperature=temperature,
                              return_entropy=return_entropy, backend=backend, chunk_size=chunk_size)
    return out.logprobs, out.entropy
