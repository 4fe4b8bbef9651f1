"""`linear_logprobs`: per-token log-probs of the targets (and entropy, logsumexp) from hidden states
and the output head, without materialising the [N, V] logits.

    logit_v  = softcap·tanh((h·w_v + b_v)/softcap) / temperature      (softcap optional)
    logprob  = logit_t − logsumexp(logits),   entropy = −Σ_v p_v log p_v,   lse = logsumexp(logits)

Positions whose target is `ignore_index` give 0 in every output and receive no gradient.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from alignfast import dispatch
from alignfast.ops import validation
from alignfast.ops.first_order import first_order
from alignfast.ops.options import LogitOptions, compute_dtype
from alignfast.ops.rowwise import RowStats


class LogProbs(NamedTuple):
    """Outputs of `linear_logprobs`, shaped like `targets`, in fp32 (fp64 for fp64 inputs)."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None = None
    lse: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------
# reference: the naive computation, the oracle of the tests and the "naive" row of the benchmarks
# ---------------------------------------------------------------------------------------------
def reference_logits(hidden, weight, bias, opts: LogitOptions) -> torch.Tensor:
    """Materialised tempered logits [N, V], computed as a user would (matmul in the input dtype)."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits.to(compute_dtype(hidden.dtype))
    if opts.softcap is not None:
        logits = opts.softcap * torch.tanh(logits / opts.softcap)
    return logits / opts.temperature


def reference_stats(hidden, weight, bias, targets, opts: LogitOptions, ignore_index: int) -> RowStats:
    logits = reference_logits(hidden, weight, bias, opts)
    valid = targets != ignore_index
    logp = F.log_softmax(logits, dim=-1)
    logprob = logp.gather(1, targets.where(valid, 0)[:, None]).squeeze(1)
    zero = logits.new_zeros(())
    entropy = -(logp.exp() * logp).sum(-1) if opts.with_entropy else None
    zmean = logits.mean(-1) if opts.with_zmean else None
    return RowStats(*(None if s is None else torch.where(valid, s, zero)
                      for s in (logprob, entropy, torch.logsumexp(logits, dim=-1), zmean)))


# ---------------------------------------------------------------------------------------------
# backend implementations (all but `reference` share this autograd Function)
# ---------------------------------------------------------------------------------------------
def implementation(backend: str):
    """The object with forward/backward(/forward_backward) for a concrete non-reference backend."""
    if backend == "chunked":
        from alignfast.ops import rowwise
        from alignfast.ops.chunked import ChunkedLogProbs

        return ChunkedLogProbs(rowwise)
    if backend in ("cpp", "cuda"):
        from alignfast.ops import cpu_layout, native_rows
        from alignfast.ops.chunked import ChunkedLogProbs

        vocab_major = backend == "cpp" and cpu_layout.token_chunks_vocab_major()
        return ChunkedLogProbs(native_rows, vocab_major=vocab_major)
    if backend == "triton":
        from alignfast.kernels import logprobs as triton_logprobs

        return triton_logprobs
    raise ValueError(f"no implementation for backend {backend!r}")


class LinearLogProbsFunction(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], bias [V] | None, targets [N], opts) -> (logprob, entropy, lse, zmean).

    Every target is valid here (ignored positions were removed by the caller). Outputs that
    were not asked for (entropy, zmean) come back empty and take no gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, opts: LogitOptions):
        ctx.set_materialize_grads(False)
        st = implementation(opts.backend).forward(hidden, weight, bias, targets, opts)
        ctx.save_for_backward(hidden, weight, bias, targets, st.lse, st.entropy)
        ctx.opts = opts
        entropy = st.entropy if opts.with_entropy else st.lse.new_empty(0)
        zmean = st.zmean if opts.with_zmean else st.lse.new_empty(0)
        absent = [t for t, asked in ((entropy, opts.with_entropy), (zmean, opts.with_zmean)) if not asked]
        if absent:
            ctx.mark_non_differentiable(*absent)
        return st.logprob, entropy, st.lse, zmean

    @staticmethod
    @first_order
    def backward(ctx, g_logprob, g_entropy, g_lse, g_zmean):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        opts: LogitOptions = ctx.opts
        grads = (g_logprob, g_entropy if opts.with_entropy else None, g_lse,
                 g_zmean if opts.with_zmean else None)
        needs = ctx.needs_input_grad[:3]
        if all(g is None for g in grads) or not any(needs):
            return None, None, None, None, None
        gh, gw, gb = implementation(opts.backend).backward(
            hidden, weight, bias, targets, lse, entropy, grads, opts, needs)
        return gh, gw, gb, None, None


def logprob_stats(hidden, weight, bias, targets, opts: LogitOptions, ignore_index: int) -> RowStats:
    """Differentiable per-token statistics for flat hidden [N, H] and targets [N] with
    `ignore_index` handled (zeros, no gradient). Shared by linear_logprobs and the losses."""
    if opts.backend == "reference":
        return reference_stats(hidden, weight, bias, targets, opts, ignore_index)
    valid = targets != ignore_index
    if bool(valid.all()):
        return RowStats(*_drop_empty(LinearLogProbsFunction.apply(hidden, weight, bias, targets, opts), opts))
    # Compact the valid rows: ignored tokens (prompts, padding) cost no vocab projection at all.
    idx = valid.nonzero().squeeze(1)
    out = LinearLogProbsFunction.apply(hidden.index_select(0, idx), weight, bias, targets.index_select(0, idx), opts)
    n = targets.shape[0]
    return RowStats(*(None if s is None else s.new_zeros(n).index_copy(0, idx, s)
                      for s in _drop_empty(out, opts)))


def _drop_empty(out, opts: LogitOptions):
    logprob, entropy, lse, zmean = out
    return logprob, entropy if opts.with_entropy else None, lse, zmean if opts.with_zmean else None


@torch.compiler.disable  # one opaque call under torch.compile: tracing the chunk loop recompiled per N
def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    bias: torch.Tensor | None = None, *, temperature: float = 1.0,
                    softcap: float | None = None, ignore_index: int = -100,
                    return_entropy: bool = False, return_lse: bool = False,
                    backend: str = "auto", chunk_size: int | None = None,
                    grad_filter_eps: float | None = None) -> LogProbs:
    """Log-probabilities of `targets` under softmax(hidden @ weight.T + bias), without the logits.

    Args:
        hidden: [N, H] or [B, T, H] last hidden states (fp32, bf16, fp16 or fp64).
        weight: [V, H] output head (`lm_head.weight`), same dtype as `hidden`.
        targets: [N] or [B, T] integer token ids in [0, V), or `ignore_index`.
        bias: optional [V] output bias.
        temperature: logits are divided by it (after the softcap). > 0.
        softcap: if given, logits become softcap·tanh(logits/softcap) (Gemma 2). > 0.
        ignore_index: targets with this value give 0 everywhere and no gradient.
        return_entropy / return_lse: also return the entropy / logsumexp of each token's
            distribution (the same tempered distribution).
        backend: "auto", or one of `alignfast.backends()`.
        chunk_size: tokens per chunk for the chunked backends (default: a 256 MiB block budget,
            ALIGNFAST_CHUNK_BYTES).
        grad_filter_eps: off (None, exact) by default. If given, the backward skips the gradient
            products of every vocab column (chunked, cpp, cuda: per token chunk) or tile (triton)
            whose every |dL/dz| = |g·(onehot − p) + …| is below it, as cut-cross-entropy does: on
            peaked logits most of the vocabulary, so most of the backward's work. Each skipped
            element is < eps in magnitude; the forward is unchanged. Not on `reference`.

    Returns:
        LogProbs(logprobs, entropy | None, lse | None), each shaped like `targets`, fp32 (fp64 for fp64
        inputs).
        Differentiable w.r.t. hidden, weight and bias, for any upstream gradient on each output.

    Example:
        >>> h, w = torch.randn(6, 16), torch.randn(100, 16)
        >>> out = linear_logprobs(h, w, torch.randint(0, 100, (6,)), return_entropy=True)
        >>> out.logprobs.shape, out.entropy.shape
        (torch.Size([6]), torch.Size([6]))
    """
    opts = make_options(hidden, weight, targets, bias, temperature=temperature, softcap=softcap,
                        ignore_index=ignore_index, backend=backend, chunk_size=chunk_size,
                        with_entropy=return_entropy, grad_filter_eps=grad_filter_eps)
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    st = logprob_stats(flat_h, weight, bias, flat_t, opts, ignore_index)
    shape = targets.shape
    return LogProbs(st.logprob.view(shape),
                    st.entropy.view(shape) if return_entropy else None,
                    st.lse.view(shape) if return_lse else None)


def make_options(hidden, weight, targets, bias, *, temperature, softcap, ignore_index, backend,
                 chunk_size, with_entropy=False, with_zmean=False, grad_filter_eps=None,
                 supported=dispatch.ALL_BACKENDS) -> LogitOptions:
    """Validates the public arguments and resolves the backend."""
    validation.check_linear_head(hidden, weight, bias)
    validation.check_targets(targets, hidden, weight.shape[0], ignore_index)
    validation.check_temperature(temperature)
    validation.check_softcap(softcap)
    validation.check_chunk_size(chunk_size)
    validation.check_positive("grad_filter_eps", grad_filter_eps, optional=True)
    resolved = dispatch.resolve(backend, hidden.device, supported=supported)
    if grad_filter_eps is not None and resolved == "reference":
        raise ValueError("grad_filter_eps needs a fused backend (chunked, cpp, cuda, triton), not 'reference'")
    return LogitOptions(temperature=float(temperature), softcap=None if softcap is None else float(softcap),
                        backend=resolved, chunk_size=None if chunk_size is None else int(chunk_size),
                        with_entropy=bool(with_entropy), with_zmean=bool(with_zmean),  # the C++ schema takes bools
                        grad_filter_eps=None if grad_filter_eps is None else float(grad_filter_eps))
