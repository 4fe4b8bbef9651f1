"""Other projects' implementations of the ops, imported lazily (each only in its own case's process).

Each adapter takes the same keyword inputs as the op's naive function and returns the same output.
"""
from __future__ import annotations

import os

import torch

# the package each adapter needs: its absence is a "skipped" row, not an error
PACKAGES = {"liger": "liger_kernel", "trl": "trl", "cce": "cut_cross_entropy"}

# TRL's default vocab tile (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16); a suite of
# scaled-down heads scales it with ALIGNFAST_BENCH_TRL_VOCAB_CHUNK
TRL_VOCAB_CHUNK = int(os.environ.get("ALIGNFAST_BENCH_TRL_VOCAB_CHUNK", 32768))
# Liger's chunked losses torch.compile their per-chunk step by default, as users run them; the
# adapter test turns it off (same arithmetic, no ~30 s compile)
LIGER_COMPILED = True


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


def _sigmoid_dpo(policy_logps, ref_logps, seq_len, beta):
    logratio = (policy_logps - ref_logps).view(-1, seq_len).sum(-1)
    chosen, rejected = logratio.chunk(2)
    return -torch.nn.functional.logsigmoid(beta * (chosen - rejected)).mean()


def trl_dpo(hidden, weight, targets, ref_hidden, ref_weight, seq_len, beta=0.1):
    """DPO on TRL's chunked log-probs for the policy and (without gradient) the reference model."""
    with torch.no_grad():
        ref = trl_logprobs(ref_hidden, ref_weight, targets)
    return _sigmoid_dpo(trl_logprobs(hidden, weight, targets), ref, seq_len, beta)


def liger_dpo(hidden, weight, targets, ref_hidden, ref_weight, seq_len, beta=0.1):
    """Liger-Kernel's LigerFusedLinearDPOLoss (torch.compile'd chunks of one pair; the policy's
    gradient formed in the forward, the reference's logits under no_grad). It runs on a CPU."""
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    h = hidden.shape[-1]
    loss = LigerFusedLinearDPOLoss(beta=beta, compiled=LIGER_COMPILED)(
        weight, hidden.view(-1, seq_len, h), targets.view(-1, seq_len),
        ref_input=ref_hidden.view(-1, seq_len, h), ref_weight=ref_weight)
    return loss[0]


def liger_kto(hidden, weight, targets, seq_len, ref_hidden, ref_weight, desirable, kl, beta=0.1):
    """Liger-Kernel's LigerFusedLinearKTOLoss with its reference model and the given z0 (`kl`):
    torch.compile'd chunks of one sequence, as liger_dpo. It runs on a CPU."""
    from liger_kernel.chunked_loss import LigerFusedLinearKTOLoss

    h = hidden.shape[-1]
    return LigerFusedLinearKTOLoss(beta=beta, compiled=LIGER_COMPILED, use_ref_model=True)(
        hidden.view(-1, seq_len, h), weight, targets.view(-1, seq_len), preference_labels=desirable,
        ref_input=ref_hidden.view(-1, seq_len, h), ref_weight=ref_weight, kl=kl)[0]


def liger_grpo(hidden, weight, targets, seq_len, ref_hidden, ref_weight, old_logprobs, advantages, beta=0.04):
    """Liger-Kernel's LigerFusedLinearGRPOLoss ("dapo", its default), the reference's log-probs in
    the same pass: chunks of one sequence, its log-probs streamed over vocab tiles (gradient by
    recompute), only the loss arithmetic torch.compile'd. It runs on a CPU."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    h = hidden.shape[-1]
    labels = targets.view(-1, seq_len)
    mask = torch.ones(labels.shape, device=labels.device)
    return LigerFusedLinearGRPOLoss(beta=beta, loss_type="dapo", compiled=LIGER_COMPILED)(
        hidden.view(-1, seq_len, h), weight, labels, mask, advantages, old_per_token_logps=old_logprobs,
        ref_input=ref_hidden.view(-1, seq_len, h), ref_weight=ref_weight)[0]


def _liger_preference(loss_class, hidden, weight, targets, seq_len, **options):
    h = hidden.shape[-1]
    return loss_class(compiled=LIGER_COMPILED, **options)(weight, hidden.view(-1, seq_len, h),
                                                          targets.view(-1, seq_len))[0]


def liger_simpo(hidden, weight, targets, seq_len, beta=2.0, gamma=0.5):
    """Liger-Kernel's LigerFusedLinearSimPOLoss (length-averaged log-probs) without its NLL term (on by
    default in the module, not part of SimPO): chunks of one pair, as liger_dpo. It runs on a CPU."""
    from liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss

    return _liger_preference(LigerFusedLinearSimPOLoss, hidden, weight, targets, seq_len, beta=beta,
                             gamma=gamma, compute_nll_loss=False)


def liger_orpo(hidden, weight, targets, seq_len, beta=0.1):
    """Liger-Kernel's LigerFusedLinearORPOLoss: the chosen NLL (token mean) plus β times the odds-ratio
    term; chunks of one pair, as liger_dpo. It runs on a CPU."""
    from liger_kernel.chunked_loss import LigerFusedLinearORPOLoss

    return _liger_preference(LigerFusedLinearORPOLoss, hidden, weight, targets, seq_len, beta=beta)


def liger_cpo(hidden, weight, targets, seq_len, beta=0.1):
    """Liger-Kernel's LigerFusedLinearCPOLoss: sigmoid on summed log-probs plus the chosen NLL (alpha
    1); chunks of one pair, as liger_dpo. It runs on a CPU."""
    from liger_kernel.chunked_loss import LigerFusedLinearCPOLoss

    return _liger_preference(LigerFusedLinearCPOLoss, hidden, weight, targets, seq_len, beta=beta, alpha=1.0)


def cce_cross_entropy(hidden, weight, targets, filter_eps=None):
    """Apple's Cut Cross-Entropy, exact gradients like every other row of its op (its own default,
    filter_eps="high", skips the backward blocks whose |p − onehot| stays below 2⁻¹²: that is the
    `cross_entropy_filtered` op's comparison, `cce_filtered_cross_entropy`)."""
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(hidden, weight, targets, filter_eps=filter_eps)


def cce_filtered_cross_entropy(hidden, weight, targets):
    """Cut Cross-Entropy with its default gradient filter (the rule alignfast's grad_filter_eps mirrors)."""
    return cce_cross_entropy(hidden, weight, targets, filter_eps="high")


def cce_logprobs(hidden, weight, targets) -> torch.Tensor:
    """Cut Cross-Entropy per token (reduction="none", exact gradients), negated into log-probs."""
    from cut_cross_entropy import linear_cross_entropy

    return -linear_cross_entropy(hidden, weight, targets, reduction="none", filter_eps=None)
