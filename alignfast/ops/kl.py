"""`linear_kl`: the full-vocabulary KL divergence between a policy and a frozen reference, per
token, from both sides' hidden states and output heads, without materialising [N, V] logits.

With x = (h·Wᵀ + b)/T and y = (h_ref·W_refᵀ + b_ref)/T the tempered logits of one token,
p = softmax(x) (policy) and q = softmax(y) (reference):

    forward  (reverse=False):  KL(π‖π_ref) = Σ_v p_v (log p_v − log q_v)
    reverse  (reverse=True):   KL(π_ref‖π) = Σ_v q_v (log q_v − log p_v)

Gradients (policy side only; the reference is a constant). With g the upstream gradient of the
token's KL and z = h·Wᵀ + b the raw policy logits (x = z/T):

    forward:  ∂KL/∂x_v = Σ_u (p_u(δ_uv − p_v))·(x_u − y_u) = p_v·((x_v − y_v) − Σ_u p_u(x_u − y_u))
                       = p_v·((log p_v − log q_v) − KL)      (the lse terms cancel: Σ_v ∂p_v = 0)
    reverse:  KL(π_ref‖π) = const − Σ_v q_v x_v + lse(x),  so  ∂KL/∂x_v = p_v − q_v
    ∂L/∂z_v = g · ∂KL/∂x_v / T;   grad_hidden = dZ·W,  grad_weight = dZᵀ·h,  grad_bias = Σ_n dZ.

Positions where `targets_mask` is False give 0 and receive no gradient (they are compacted away
before any vocab projection).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from alignfast import dispatch
from alignfast.ops import native_rows, validation
from alignfast.ops.chunked import _BlockBuffer, _GradAccumulator, logits_block
from alignfast.ops.first_order import first_order
from alignfast.ops.gradient_in_forward import GradientInForward
from alignfast.ops.logprobs import reference_logits
from alignfast.ops.options import LogitOptions, budget_rows, compute_dtype, vocab_block_shape

KL_BACKENDS = ("reference", "chunked", "triton", "cpp", "cuda")
NATIVE = ("cpp", "cuda")
REDUCTIONS = ("none", "mean", "sum")


def kl_backends() -> tuple[str, ...]:
    """The backends this op offers here: `cpp`/`cuda` only with an `alignfast._C` that has the KL kernels."""
    return KL_BACKENDS if native_rows.kl_available() else tuple(b for b in KL_BACKENDS if b not in NATIVE)


@dataclass(frozen=True)
class KLOptions:
    """The non-tensor options of `linear_kl` that travel through autograd."""

    temperature: float = 1.0
    reverse: bool = False  # True: KL(π_ref‖π)
    backend: str = "chunked"
    chunk_size: int | None = None  # tokens per chunk for the chunked path; None: from the byte budget

    def block_shape(self, tokens: int, vocab: int, dtype: torch.dtype = torch.float32) -> tuple[int, int]:
        """(rows, cols) of the [rows, cols] logits blocks: `chunk_size` tokens by the whole vocabulary,
        or the byte budget shared by the blocks a step holds — the policy's and the reference's, plus,
        in PyTorch's row math (`chunked`), one transient one (its logsumexp; the native kernels need
        none) — as all tokens by a vocab slice where that slice is wide enough (`vocab_block_shape`)."""
        if self.chunk_size is not None:
            return self.chunk_size, vocab
        return vocab_block_shape(tokens, vocab, dtype, blocks=2 if self.backend in NATIVE else 3)


class KLStats(NamedTuple):
    """Per-token results of a forward pass, each [N] in fp32 (fp64 for fp64 inputs)."""

    kl: torch.Tensor
    lse: torch.Tensor      # logsumexp_v x_v (policy)
    ref_lse: torch.Tensor  # logsumexp_v y_v (reference)


# ---------------------------------------------------------------------------------------------
# reference: the naive computation (materialised logits), the "naive" row of the benchmarks
# ---------------------------------------------------------------------------------------------
def reference_kl(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, opts: KLOptions) -> torch.Tensor:
    """Per-token KL [N] from materialised [N, V] logits of both sides (float64-capable)."""
    logit_opts = LogitOptions(temperature=opts.temperature)
    logp = F.log_softmax(reference_logits(hidden, weight, bias, logit_opts), dim=-1)
    with torch.no_grad():
        logq = F.log_softmax(reference_logits(ref_hidden, ref_weight, ref_bias, logit_opts), dim=-1)
    if opts.reverse:
        return (logq.exp() * (logq - logp)).sum(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


# ---------------------------------------------------------------------------------------------
# chunked (and cpp / cuda): token chunks, a policy and a reference [rows, V] block each; two
# projections per chunk forward, four backward. The row math on each pair of blocks is PyTorch's
# (`TorchKLRows`) or the native kernels' (`NativeKLRows`, csrc/kl_rows.h).
# ---------------------------------------------------------------------------------------------
def _tempered_(z: torch.Tensor, temperature: float) -> torch.Tensor:
    return z.div_(temperature) if temperature != 1.0 else z


class TorchKLRows:
    """The row math in PyTorch ops; both blocks are overwritten."""

    @staticmethod
    def stats(z, z_ref, opts: KLOptions):
        """(kl, lse, ref_lse) [rows] of raw logits blocks z, z_ref [rows, V]."""
        x, y = _tempered_(z, opts.temperature), _tempered_(z_ref, opts.temperature)
        # log p = (x − max) − log Σ e^{x − max], as log_softmax forms it: x − lse would round at lse's
        # magnitude (|lse| in the hundreds for peaked or tempered rows: ~1e-5 relative error in p)
        m, m_ref = x.amax(dim=1, keepdim=True), y.amax(dim=1, keepdim=True)
        logp, logq = x.sub_(m), y.sub_(m_ref)
        log_s, ref_log_s = torch.logsumexp(logp, dim=1), torch.logsumexp(logq, dim=1)
        logp.sub_(log_s[:, None]), logq.sub_(ref_log_s[:, None])
        lse, ref_lse = m.squeeze(1) + log_s, m_ref.squeeze(1) + ref_log_s
        # KL = Σ e^{w}(w − o) with (w, o) = (log p, log q), or (log q, log p) for the reverse KL.
        w, o = (logq, logp) if opts.reverse else (logp, logq)
        d = o.sub_(w).neg_()  # w − o
        return w.exp_().mul_(d).sum(dim=1), lse, ref_lse

    @staticmethod
    def grad_(z, z_ref, lse, ref_lse, kl, g, opts: KLOptions):
        """∂(Σ g·kl)/∂z [rows, V], in z's memory."""
        logp = _tempered_(z, opts.temperature).sub_(lse[:, None])
        logq = _tempered_(z_ref, opts.temperature).sub_(ref_lse[:, None])
        coef = (g.to(z.dtype) / opts.temperature)[:, None]
        if opts.reverse:  # ∂L/∂z = g/T · (p − q)
            return logp.exp_().sub_(logq.exp_()).mul_(coef)
        r = logq.sub_(logp).neg_().sub_(kl[:, None])  # ∂L/∂z = g/T · p · (log p − log q − KL)
        return logp.exp_().mul_(r).mul_(coef)


class NativeKLRows:
    """The row math in `alignfast._C`'s KL kernels: one pass over both blocks, one over z for the gradient."""

    @staticmethod
    def stats(z, z_ref, opts: KLOptions):
        return native_rows.kl_stats(z, z_ref, opts.temperature, opts.reverse)

    @staticmethod
    def grad_(z, z_ref, lse, ref_lse, kl, g, opts: KLOptions):
        return native_rows.kl_grad_(z, z_ref, lse, ref_lse, kl, g, opts.temperature, opts.reverse)


class ChunkedKL:
    """Forward and backward of the KL over [rows, cols] blocks (`KLOptions.block_shape`): all tokens by a
    vocab slice where it fits, so every product has N as a dimension and each row of grad_weight is
    written once. Per block, a policy and a reference block (two buffers reused by every block); the
    forward merges the slices' statistics per row (`_merge_kl_slices`); the backward recomputes both
    sides (the reference under no_grad), turns them into dZ in place (only per-row scalars needed)
    and pushes dZ into grad_hidden / grad_weight / grad_bias."""

    def __init__(self, rows):
        self.rows = rows

    @staticmethod
    def _blocks(sl, vs, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, bufs):
        b, rb = (None if x is None else x[vs] for x in (bias, ref_bias))
        z = logits_block(hidden[sl], weight[vs], b, out=bufs[0])
        with torch.no_grad():
            z_ref = logits_block(ref_hidden[sl], ref_weight[vs], rb, out=bufs[1])
        return z, z_ref

    @staticmethod
    def _layout(hidden, weight, opts: KLOptions):
        """(rows, cols, the two block buffers)."""
        n, cdtype = hidden.shape[0], compute_dtype(hidden.dtype)
        rows, cols = opts.block_shape(n, weight.shape[0], cdtype)
        size = min(rows, n) * cols
        return rows, cols, [torch.empty(size, dtype=cdtype, device=hidden.device) for _ in range(2)]

    def forward(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, opts: KLOptions) -> KLStats:
        n, vocab = hidden.shape[0], weight.shape[0]
        out = KLStats(*(torch.empty(n, dtype=compute_dtype(hidden.dtype), device=hidden.device) for _ in range(3)))
        rows, cols, bufs = self._layout(hidden, weight, opts)
        for start in range(0, n, rows):
            sl = slice(start, start + rows)
            parts = []
            for v0 in range(0, vocab, cols):
                vs = slice(v0, min(v0 + cols, vocab))
                z, z_ref = self._blocks(sl, vs, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, bufs)
                parts.append(self.rows.stats(z, z_ref, opts))
            out.kl[sl], out.lse[sl], out.ref_lse[sl] = _merge_kl_slices(parts, opts.reverse)
        return out

    def backward(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, stats: KLStats, grad_kl,
                 opts: KLOptions, needs):
        """(grad_hidden | None, grad_weight | None, grad_bias | None) of Σ_n grad_kl[n]·KL[n]."""
        n, vocab = hidden.shape[0], weight.shape[0]
        rows, cols, bufs = self._layout(hidden, weight, opts)
        acc = _GradAccumulator(hidden, weight, bias, needs, whole_rows=cols >= vocab)
        for start in range(0, n, rows):
            sl = slice(start, start + rows)
            row_args = (stats.lse[sl], stats.ref_lse[sl], stats.kl[sl], grad_kl[sl])
            for v0 in range(0, vocab, cols):
                vs = slice(v0, min(v0 + cols, vocab))
                z, z_ref = self._blocks(sl, vs, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, bufs)
                acc.add(sl, self.rows.grad_(z, z_ref, *row_args, opts), vs)
        return acc.result()

    def forward_backward(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, opts: KLOptions,
                         token_weights, needs):
        """(kl [N], grads of Σ_n w_n·KL[n]) in one sweep, the weights w (a float, or [N]) being known:
        token chunks of whole rows (a row's KL enters its own gradient), each chunk's gradient pushed at
        once: 4 vocab projections instead of 6. The native row kernels only (their stats leave the
        blocks intact for the gradient pass)."""
        n, vocab, cdtype = hidden.shape[0], weight.shape[0], compute_dtype(hidden.dtype)
        rows = opts.chunk_size or budget_rows(vocab, cdtype, blocks=2)
        bufs = [torch.empty(min(rows, n) * vocab, dtype=cdtype, device=hidden.device) for _ in range(2)]
        acc = _GradAccumulator(hidden, weight, bias, needs)
        kl, everything = torch.empty(n, dtype=cdtype, device=hidden.device), slice(0, vocab)
        for start in range(0, n, rows):
            sl = slice(start, start + rows)
            z, z_ref = self._blocks(sl, everything, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, bufs)
            kl_rows, lse, ref_lse = self.rows.stats(z, z_ref, opts)
            kl[sl] = kl_rows
            g = (token_weights[sl].to(kl_rows.dtype) if torch.is_tensor(token_weights)
                 else torch.full_like(kl_rows, token_weights))
            acc.add(sl, self.rows.grad_(z, z_ref, lse, ref_lse, kl_rows, g, opts))
        return kl, acc.result()


def _merge_kl_slices(parts, reverse: bool):
    """Whole-row (kl, lse, ref_lse) from each vocab slice b's own (kl_b, lse_b, ref_lse_b), the KL between
    the slice's renormalised distributions: with w_b = e^{lse_b − lse} and r_b = e^{ref_lse_b − ref_lse}
    the slices' masses under p and q, KL(p‖q) = Σ_b w_b·(kl_b + log w_b − log r_b), and
    KL(q‖p) = Σ_b r_b·(kl_b + log r_b − log w_b)."""
    if len(parts) == 1:
        return parts[0]
    kl_b, lse_b, ref_lse_b = (torch.stack(x) for x in zip(*parts))
    lse, ref_lse = torch.logsumexp(lse_b, dim=0), torch.logsumexp(ref_lse_b, dim=0)
    log_w, log_r = lse_b - lse, ref_lse_b - ref_lse
    if reverse:
        return (log_r.exp() * (kl_b + log_r - log_w)).sum(dim=0), lse, ref_lse
    return (log_w.exp() * (kl_b + log_w - log_r)).sum(dim=0), lse, ref_lse


def implementation(backend: str):
    """The object with forward/backward for a concrete non-reference backend of `linear_kl`."""
    if backend == "chunked":
        return ChunkedKL(TorchKLRows)
    if backend in NATIVE:
        return ChunkedKL(NativeKLRows)
    if backend == "triton":
        from alignfast.kernels import kl as triton_kl

        return triton_kl
    raise ValueError(f"linear_kl has no implementation for backend {backend!r}; "
                     f"available: {list(KL_BACKENDS)}")


class LinearKLFunction(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], bias [V] | None, ref_hidden [N, H_ref], ref_weight [V, H_ref],
    ref_bias [V] | None, opts) -> kl [N]. Every row is valid here (masked rows were removed by the
    caller). The reference tensors are constants: they never receive a gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, opts: KLOptions):
        ctx.set_materialize_grads(False)
        impl = implementation(opts.backend)
        st = impl.forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, opts)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, *st)
        ctx.opts = opts
        return st.kl

    @staticmethod
    @first_order
    def backward(ctx, grad_kl):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, *st = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if grad_kl is None or not any(needs):
            return (None,) * 7
        gh, gw, gb = implementation(ctx.opts.backend).backward(
            hidden, weight, bias, ref_hidden, ref_weight, ref_bias, KLStats(*st), grad_kl, ctx.opts, needs)
        return gh, gw, gb, None, None, None, None


class FusedWeightedKLFunction(GradientInForward):
    """Σ_n w_n·KL[n] (w a float, or [N] per-row weights) with its gradient formed in the forward (native
    backends) and scaled in the backward; the per-row KL, a by-product, goes to `side["kl"]`."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, opts: KLOptions, token_weights,
                side: dict):
        ctx.num_inputs = 9
        kl, grads = implementation(opts.backend).forward_backward(
            hidden, weight, bias, ref_hidden, ref_weight, ref_bias, opts, token_weights, ctx.needs_input_grad[:3])
        GradientInForward.save_gradients(ctx, grads)
        side["kl"] = kl
        return (kl * token_weights.to(kl.dtype)).sum() if torch.is_tensor(token_weights) else kl.sum() * token_weights


def weighted_kl_sum(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets_mask, opts: KLOptions,
                    token_weights):
    """(Σ_n w_n·KL[n] over the rows targets_mask keeps, the per-row KL [N] detached (0 where masked)) for
    flat hidden [N, H], ref_hidden [N, H_ref] and validated options; w a float or [N]. When a gradient
    is wanted and the backend is native, the gradient is formed in the forward (4 vocab projections,
    not 6). For validated input; shared with the losses (PPO's full-vocabulary KL penalty)."""
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not (wants_grad and opts.backend in NATIVE):
        kl = kl_per_token(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets_mask, opts)
        w = token_weights.to(kl.dtype) if torch.is_tensor(token_weights) else token_weights
        return (kl * w).sum(), kl.detach()
    if targets_mask is not None:   # masked rows cost no vocab projection
        idx = targets_mask.nonzero().squeeze(1)
        hidden, ref_hidden = hidden.index_select(0, idx), ref_hidden.index_select(0, idx)
        if torch.is_tensor(token_weights):
            token_weights = token_weights.index_select(0, idx)
    side: dict = {}
    total = FusedWeightedKLFunction.apply(hidden, weight, bias, ref_hidden.detach(), ref_weight.detach(),
                                          None if ref_bias is None else ref_bias.detach(), opts,
                                          token_weights, side)
    kl = side["kl"]
    if targets_mask is not None:
        kl = kl.new_zeros(targets_mask.shape[0]).index_copy(0, idx, kl)
    return total, kl


class FusedKLPenalty:
    """Σ_n w_n·KL[n] (per-token weights known up front) riding along a fused loss's policy pass
    (`ChunkedLogProbs.forward_backward(extra=...)`, through `LinearLossBase._loss(extra=...)`): for each
    token chunk, the policy's raw logits block, before the pass's row kernels overwrite it, and the
    reference's block of the same rows give the rows' KL and its gradient, which the native kernel
    writes into the reference's block for the pass to add to its own. The policy's projections are
    shared: 4 vocab projections for a loss plus this penalty (policy, reference, grad_hidden,
    grad_weight) where a separate `weighted_kl_sum` takes 7. Native backends only (their KL kernels
    leave z as it is and can write beside it); `blocks`: the chunk holds the policy's and the
    reference's block within the byte budget.

    ref_hidden [N, H_ref], ref_weight, ref_bias: the reference (no gradient); token_weights [N]: w, in
    the same row order as the loss's flat rows; `bind(index)` takes the rows in the pass's order."""

    blocks = 2

    def __init__(self, ref_hidden, ref_weight, ref_bias, token_weights, opts: KLOptions):
        self.ref_hidden, self.ref_weight = ref_hidden.detach(), ref_weight.detach()
        self.ref_bias = None if ref_bias is None else ref_bias.detach()
        self.token_weights, self.opts = token_weights, opts
        self.index = self.kl = None
        self._block = None

    def supports(self, backend: str) -> bool:
        """Whether a policy pass on `backend` can carry this term (native KL kernels that write beside z)."""
        return backend in NATIVE and native_rows.kl_grad_into_ref_available()

    def bind(self, index: torch.Tensor) -> "FusedKLPenalty":
        """The pass's rows: `index` [n] of the flat rows, in the pass's order."""
        self.index = index
        self.ref_rows = self.ref_hidden.index_select(0, index)
        self.weights = self.token_weights.index_select(0, index)
        self.kl = torch.empty(index.numel(), dtype=compute_dtype(self.ref_hidden.dtype), device=index.device)
        self._weighted = bool(self.weights.any())  # kl_coef 0: the KL for the metric only, no gradient
        self._block = _BlockBuffer(self.ref_hidden, self.ref_weight)
        return self

    def __call__(self, rows: slice, z: torch.Tensor) -> torch.Tensor | None:
        """∂(Σ_rows w·KL)/∂z for the rows' raw policy logits z [r, V] (row-major, left as it is), in this
        term's own block; the rows' KLs go to `self.kl`."""
        n = rows.stop - rows.start
        z_ref = logits_block(self.ref_rows[rows], self.ref_weight, self.ref_bias, out=self._block(n))
        kl, lse, ref_lse = native_rows.kl_stats(z, z_ref, self.opts.temperature, self.opts.reverse)
        self.kl[rows] = kl
        if not self._weighted:
            return None
        return native_rows.kl_grad_(z, z_ref, lse, ref_lse, kl, self.weights[rows].to(kl.dtype),
                                    self.opts.temperature, self.opts.reverse, into_ref=True)

    def total(self) -> torch.Tensor:
        """Σ w·KL over the bound rows (after the pass)."""
        return (self.kl * self.weights.to(self.kl.dtype)).sum()

    def per_row(self, n_rows: int) -> torch.Tensor:
        """The KL [n_rows] of the flat rows, 0 where the pass had none (after the pass)."""
        return self.kl.new_zeros(n_rows).index_copy_(0, self.index, self.kl)


def kl_per_token(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets_mask, opts: KLOptions):
    """Differentiable per-token KL [N] for flat hidden [N, H], ref_hidden [N, H_ref] and an optional
    targets_mask [N] (False: 0, no gradient). For validated input; shared with the losses."""
    ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
    ref_bias = None if ref_bias is None else ref_bias.detach()
    if opts.backend == "reference":
        kl = reference_kl(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, opts)
        return kl if targets_mask is None else torch.where(targets_mask, kl, kl.new_zeros(()))
    if targets_mask is None or bool(targets_mask.all()):
        return LinearKLFunction.apply(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, opts)
    # Compact the valid rows: masked tokens (prompts, padding) cost no vocab projection at all.
    idx = targets_mask.nonzero().squeeze(1)
    kl = LinearKLFunction.apply(hidden.index_select(0, idx), weight, bias, ref_hidden.index_select(0, idx),
                                ref_weight, ref_bias, opts)
    return kl.new_zeros(targets_mask.shape[0]).index_copy(0, idx, kl)


@torch.compiler.disable  # one opaque call under torch.compile: tracing the chunk loop recompiled per N
def linear_kl(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor, ref_weight: torch.Tensor,
              *, bias: torch.Tensor | None = None, ref_bias: torch.Tensor | None = None,
              targets_mask: torch.Tensor | None = None, reverse: bool = False, temperature: float = 1.0,
              backend: str = "auto", chunk_size: int | None = None, reduction: str = "none") -> torch.Tensor:
    """Per-token KL(π‖π_ref) over the full vocabulary (reverse=True: KL(π_ref‖π)), without logits.

    π = softmax((hidden @ weight.T + bias)/T), π_ref = softmax((ref_hidden @ ref_weight.T + ref_bias)/T).

    Args:
        hidden: [N, H] or [B, T, H] policy hidden states (fp32, bf16, fp16 or fp64).
        weight: [V, H] policy output head, same dtype as `hidden`.
        ref_hidden: reference hidden states, [N, H_ref] or [B, T, H_ref]: the same leading shape
            and dtype as `hidden`; H_ref may differ from H.
        ref_weight: [V, H_ref] reference output head (same V as `weight`).
        bias, ref_bias: optional [V] output biases.
        targets_mask: optional bool, shaped like hidden's leading dims; False positions give 0 and
            no gradient (like `ignore_index`).
        reverse: False for KL(π‖π_ref) = Σ p (log p − log q), True for KL(π_ref‖π) = Σ q (log q − log p).
        temperature: both sides' logits are divided by it. > 0.
        backend: "auto", "reference", "chunked", "triton", "cpp" or "cuda" (`auto` picks `cpp` on a
            CPU with `alignfast._C`, else `chunked`; `triton` on CUDA).
        chunk_size: tokens per chunk for the chunked backend (default: from the byte budget,
            ALIGNFAST_CHUNK_BYTES).
        reduction: "none" (per token), "mean" (over the positions targets_mask keeps; 0 if none) or
            "sum". Reduced, the upstream gradient of every token is known in the forward, so the
            native backends (`cpp`, `cuda`) form the gradient there: 4 vocab projections instead of 6.

    Returns:
        kl shaped like hidden's leading dims (a scalar when reduced), fp32 (fp64 for fp64 inputs).
        Differentiable w.r.t. hidden, weight and bias for any upstream gradient; the reference side (ref_hidden,
        ref_weight, ref_bias) is treated as a constant and never receives a gradient, even if
        it requires one. Not clamped: in low precision a KL near 0 may come out slightly negative.

    Example:
        >>> h, w = torch.randn(6, 16, requires_grad=True), torch.randn(100, 16)
        >>> h_ref, w_ref = torch.randn(6, 8), torch.randn(100, 8)
        >>> kl = linear_kl(h, w, h_ref, w_ref)
        >>> kl.shape
        torch.Size([6])
        >>> kl.mean().backward()
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is unknown; choose one of {list(REDUCTIONS)}")
    opts = make_kl_options(hidden, weight, ref_hidden, ref_weight, bias, ref_bias, targets_mask,
                           reverse=reverse, temperature=temperature, backend=backend, chunk_size=chunk_size)
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_ref = ref_hidden.reshape(-1, ref_hidden.shape[-1])
    mask = None if targets_mask is None else targets_mask.reshape(-1)
    if reduction == "none":
        return kl_per_token(flat_h, weight, bias, flat_ref, ref_weight, ref_bias, mask, opts).view(hidden.shape[:-1])
    count = flat_h.shape[0] if mask is None else int(mask.sum())
    token_weight = 1.0 / max(count, 1) if reduction == "mean" else 1.0
    return weighted_kl_sum(flat_h, weight, bias, flat_ref, ref_weight, ref_bias, mask, opts, token_weight)[0]


def make_kl_options(hidden, weight, ref_hidden, ref_weight, bias, ref_bias, targets_mask, *, reverse,
                    temperature, backend, chunk_size) -> KLOptions:
    """Validates the public arguments of `linear_kl` and resolves the backend."""
    validation.check_linear_head(hidden, weight, bias)
    validation.check_linear_head(ref_hidden, ref_weight, ref_bias, prefix="ref_")
    shape = validation._shape
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight {shape(ref_weight)} and weight {shape(weight)} disagree on V: "
                         f"{ref_weight.shape[0]} != {weight.shape[0]}")
    if ref_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(f"ref_hidden {shape(ref_hidden)} must have hidden's leading shape "
                         f"{shape(hidden)[:-1]} (hidden is {shape(hidden)})")
    if ref_hidden.dtype != hidden.dtype:
        raise ValueError(f"ref_hidden ({ref_hidden.dtype}) and hidden ({hidden.dtype}) must have the same "
                         f"dtype")
    if ref_hidden.device != hidden.device:
        raise ValueError(f"ref_hidden is on {ref_hidden.device} but hidden is on {hidden.device}")
    if targets_mask is not None:
        validation.require_tensor("targets_mask", targets_mask)
        if targets_mask.dtype != torch.bool:
            raise ValueError(f"targets_mask must be a bool tensor, got {targets_mask.dtype} "
                             f"(shape {shape(targets_mask)})")
        if targets_mask.shape != hidden.shape[:-1]:
            raise ValueError(f"targets_mask shape {shape(targets_mask)} must equal hidden's leading shape "
                             f"{shape(hidden)[:-1]} (hidden is {shape(hidden)})")
        if targets_mask.device != hidden.device:
            raise ValueError(f"targets_mask is on {targets_mask.device} but hidden is on {hidden.device}")
    if not isinstance(reverse, bool):
        raise ValueError(f"reverse must be a bool, got {reverse!r}")
    validation.check_temperature(temperature)
    validation.check_chunk_size(chunk_size)
    resolved = dispatch.resolve(backend, hidden.device, supported=kl_backends())
    return KLOptions(temperature=float(temperature), reverse=reverse, backend=resolved, chunk_size=chunk_size)
