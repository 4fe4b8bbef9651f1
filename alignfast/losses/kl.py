"""Per-token KL estimators between the policy and a reference, from sampled-token log-probs.

Schulman, "Approximating KL Divergence" (2020), http://joschu.net/blog/kl-approx.html.
With tokens sampled from the policy π and r = π_ref(x)/π(x) = exp(ref − logp):

    k1 = log π − log π_ref            = −log r          unbiased, high variance, can be negative
    k2 = ½ (log π − log π_ref)²       = ½ (log r)²      biased, low variance, ≥ 0
    k3 = r − log r − 1                = exp(ref − logp) − (ref − logp) − 1
                                                         unbiased, low variance, ≥ 0 (GRPO's KL term)

All three estimate KL(π ‖ π_ref) when the tokens come from π.
"""
from __future__ import annotations

import torch

from alignfast.losses._validation import check_choice, check_floats, compute_dtype

KL_ESTIMATORS = ("k1", "k2", "k3")


def token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference.

    Args:
        logprobs: [...] policy log-probs of the sampled tokens (any shape, e.g. [B, T]).
        ref_logprobs: [...] reference log-probs of the same tokens, same shape.
        estimator: ``"k1"`` (logp − ref), ``"k2"`` (½(logp − ref)²) or ``"k3"`` (exp(ref − logp) − (ref − logp) − 1).

    Returns:
        [...] the estimate per token, in float32 (float64 for float64 inputs); differentiable with
        respect to both inputs. Masking is the caller's business (multiply by the mask).
    """
    check_choice("estimator", estimator, KL_ESTIMATORS)
    check_floats({"logprobs": logprobs, "ref_logprobs": ref_logprobs})
    dtype = compute_dtype(logprobs, ref_logprobs)
    log_ratio = logprobs.to(dtype) - ref_logprobs.to(dtype)  # log π − log π_ref
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    # k3 with log r = ref − logp = −log_ratio; expm1 keeps r − 1 accurate near r = 1.
    return torch.expm1(-log_ratio) + log_ratio
