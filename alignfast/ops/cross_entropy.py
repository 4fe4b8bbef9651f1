"""`linear_cross_entropy`: SFT's loss from hidden states, equal to `F.cross_entropy` on the logits.

    loss_n = −(1−ε)·logprob_n + ε·(lse_n − mean_v logit_v) + z_loss·lse_n²

(ε = label_smoothing; the ε term is the mean over the vocab of −log p_v, as torch defines it;
z_loss as in PaLM). "mean" divides by the number of non-ignored tokens (0 when there are none,
where torch would give NaN).

With a "mean" or "sum" reduction the upstream gradient of every token is known in the forward,
so the chunked backends compute the gradient there too: 3 vocab projections instead of 4.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alignfast.ops.gradient_in_forward import GradientInForward
from alignfast.ops.logprobs import implementation, logprob_stats, make_options, reference_logits
from alignfast.ops.options import LogitOptions
from alignfast.ops.validation import is_real

REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class CrossEntropyTerms:
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    token_weight: float = 1.0  # 1/n_valid for "mean", 1 for "sum"

    def per_token(self, logprob, lse, zmean):
        loss = -(1.0 - self.label_smoothing) * logprob
        if self.label_smoothing:
            loss = loss + self.label_smoothing * (lse - zmean)
        if self.z_loss:
            loss = loss + self.z_loss * lse.square()
        return loss

    def upstream(self, st):
        """(g_logprob, g_entropy, g_lse, g_zmean) of Σ_n token_weight·loss_n, per chunk."""
        w, eps = self.token_weight, self.label_smoothing
        g_logprob = torch.full_like(st.lse, -(1.0 - eps) * w)
        g_lse = None
        if eps or self.z_loss:
            g_lse = (eps + 2.0 * self.z_loss * st.lse) * w
        g_zmean = torch.full_like(st.lse, -eps * w) if eps else None
        return g_logprob, None, g_lse, g_zmean


class FusedLinearCrossEntropyFunction(GradientInForward):
    """Reduced cross-entropy whose gradient is computed in the forward and scaled in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, opts: LogitOptions, terms: CrossEntropyTerms):
        ctx.num_inputs = 6
        st, grads = implementation(opts.backend).forward_backward(
            hidden, weight, bias, targets, opts, terms.upstream, ctx.needs_input_grad[:3])
        GradientInForward.save_gradients(ctx, grads)
        return terms.per_token(st.logprob, st.lse, st.zmean).sum() * terms.token_weight


@torch.compiler.disable  # one opaque call under torch.compile: tracing the chunk loop recompiled per N
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, *, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                         softcap: float | None = None, temperature: float = 1.0, backend: str = "auto",
                         chunk_size: int | None = None, grad_filter_eps: float | None = None) -> torch.Tensor:
    """Cross-entropy of `targets` under softmax(hidden @ weight.T + bias), without the logits.

    Args:
        hidden: [N, H] or [B, T, H]; weight: [V, H]; targets: [N] or [B, T]; bias: [V] | None.
        reduction: "mean" (over non-ignored tokens), "sum", or "none" (shaped like targets,
            0 at ignored positions).
        label_smoothing: ε in [0, 1], as in `torch.nn.functional.cross_entropy`.
        z_loss: coefficient of lse² (PaLM's auxiliary loss), ≥ 0.
        softcap, temperature, backend, chunk_size, grad_filter_eps: as in `linear_logprobs` (the
            filter applies to dL/dz, which a "mean" reduction scales by 1/tokens).

    Returns a scalar fp32 loss (or per-token losses for reduction="none").

    Example:
        >>> h, w = torch.randn(8, 16, requires_grad=True), torch.randn(100, 16)
        >>> loss = linear_cross_entropy(h, w, torch.randint(0, 100, (8,)))
        >>> loss.backward()
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is unknown; choose one of {list(REDUCTIONS)}")
    if not is_real(label_smoothing) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if not is_real(z_loss) or not 0.0 <= z_loss < math.inf:
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    opts = make_options(hidden, weight, targets, bias, temperature=temperature, softcap=softcap,
                        ignore_index=ignore_index, backend=backend, chunk_size=chunk_size,
                        with_zmean=bool(label_smoothing), grad_filter_eps=grad_filter_eps)
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    valid = flat_t != ignore_index
    n_valid = int(valid.sum())
    terms = CrossEntropyTerms(float(label_smoothing), float(z_loss),
                              1.0 / max(n_valid, 1) if reduction == "mean" else 1.0)

    if opts.backend == "reference":
        return reference_cross_entropy(flat_h, weight, bias, flat_t, opts, terms, ignore_index,
                                       reduction).reshape(targets.shape if reduction == "none" else ())

    tensors = (flat_h, weight) + (() if bias is None else (bias,))
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if reduction != "none" and wants_grad and opts.backend in ("chunked", "cpp", "cuda"):
        if n_valid < flat_t.numel():
            idx = valid.nonzero().squeeze(1)
            flat_h, flat_t = flat_h.index_select(0, idx), flat_t.index_select(0, idx)
        return FusedLinearCrossEntropyFunction.apply(flat_h, weight, bias, flat_t, opts, terms)

    st = logprob_stats(flat_h, weight, bias, flat_t, opts, ignore_index)
    losses = terms.per_token(st.logprob, st.lse, st.zmean)  # 0 at ignored positions: all stats are 0
    if reduction == "none":
        return losses.view(targets.shape)
    return losses.sum() * terms.token_weight


def reference_cross_entropy(hidden, weight, bias, targets, opts, terms: CrossEntropyTerms, ignore_index,
                            reduction):
    """Naive: materialised logits and `F.cross_entropy` (plus the z-loss), the benchmarks' baseline."""
    logits = reference_logits(hidden, weight, bias, opts)
    losses = F.cross_entropy(logits, targets.long(), ignore_index=ignore_index, reduction="none",
                             label_smoothing=terms.label_smoothing)
    if terms.z_loss:
        valid = targets != ignore_index
        losses = losses + terms.z_loss * torch.where(valid, torch.logsumexp(logits, -1), 0.0).square()
    if reduction == "none":
        return losses
    return losses.sum() * terms.token_weight
