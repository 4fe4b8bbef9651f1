"""alignfast: fused-kernel LLM post-training.

Log-probs, entropies, KL to a reference and alignment losses computed straight from hidden
states and the `lm_head` weight, streaming the vocabulary so the [tokens, vocab] logits never
exist.
"""
from alignfast.dispatch import backends
from alignfast.ops import LogProbs, linear_cross_entropy, linear_kl, linear_logprobs
from alignfast import losses  # noqa: E402  (after the ops it builds on)

__version__ = "0.1.0"

__all__ = ["LogProbs", "backends", "linear_cross_entropy", "linear_kl", "linear_logprobs", "losses", "__version__"]
