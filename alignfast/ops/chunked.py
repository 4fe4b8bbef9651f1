"""The token-chunked driver shared by the `chunked` and `cpp` backends.

Tokens are processed `rows` at a time (a byte budget, see `LogitOptions.chunk_rows`): one BLAS
call makes the [rows, V] block of logits, a row kernel (`alignfast.ops.rowwise` in PyTorch, or
`alignfast.ops.native_rows` in C++) reduces it or turns it into its gradient in place, and two
more BLAS calls push that gradient to `hidden` and `weight`. The [N, V] logits never exist.

Vocab projections per call: forward 1; backward 3 (recompute, grad_hidden, grad_weight);
`forward_backward`, for an upstream gradient known in the forward (mean/sum cross-entropy), 3.
"""
from __future__ import annotations

from typing import Callable

import torch

from alignfast.ops.options import LogitOptions, compute_dtype
from alignfast.ops.rowwise import RowStats

# (g_logprob, g_entropy, g_lse, g_zmean) for one chunk, from that chunk's statistics.
Upstream = Callable[[RowStats], tuple]


def logits_block(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Raw logits h·Wᵀ + b of a chunk of tokens, in the accumulation dtype; written into the first
    rows of `out` (a reused [≥rows, V] buffer in that dtype, see `_BlockBuffer`) when given."""
    cdtype = compute_dtype(hidden.dtype)
    if out is not None and hidden.dtype == cdtype:
        out = out[: hidden.shape[0]]
        return (torch.mm(hidden, weight.t(), out=out) if bias is None
                else torch.addmm(bias, hidden, weight.t(), out=out))
    z = torch.mm(hidden, weight.t()) if bias is None else torch.addmm(bias, hidden, weight.t())
    return z.to(cdtype) if out is None else out[: hidden.shape[0]].copy_(z)


class _BlockBuffer:
    """The [rows, V] logits buffer of one pass, reused by every chunk. A fresh block per chunk would
    pay its page faults again each time on CPU (≈0.2 s of kernel time per 256 MiB block: as much as
    the native row kernels' whole work on it), and briefly hold two blocks."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor):
        self.vocab, self.dtype, self.device = weight.shape[0], compute_dtype(hidden.dtype), hidden.device
        self.buf = None

    def __call__(self, rows: int) -> torch.Tensor:
        if self.buf is None or self.buf.shape[0] < rows:
            self.buf = None
            self.buf = torch.empty(rows, self.vocab, dtype=self.dtype, device=self.device)
        return self.buf


class ChunkedLogProbs:
    """Forward, backward and fused forward-backward over token chunks, for one row-kernel set."""

    def __init__(self, rows):
        self.rows = rows  # a module with `stats(z, targets, opts)` and `grad_(z, targets, ...)`

    def forward(self, hidden, weight, bias, targets, opts: LogitOptions) -> RowStats:
        n, cdtype = hidden.shape[0], compute_dtype(hidden.dtype)
        out = _empty_stats(n, opts, cdtype, hidden.device)
        step = opts.chunk_rows(weight.shape[0], cdtype)
        block = _BlockBuffer(hidden, weight)
        for start in range(0, n, step):
            sl = slice(start, start + step)
            z = logits_block(hidden[sl], weight, bias, out=block(min(step, n)))
            _store(out, sl, self.rows.stats(z, targets[sl], opts))
        return out

    def backward(self, hidden, weight, bias, targets, lse, entropy, grads, opts: LogitOptions, needs):
        """grads = (g_logprob, g_entropy, g_lse, g_zmean), each [N] or None; needs = which of
        (hidden, weight, bias) want a gradient."""
        acc = _GradAccumulator(hidden, weight, bias, needs, opts.grad_filter_eps)
        step = opts.chunk_rows(weight.shape[0], compute_dtype(hidden.dtype))
        block = _BlockBuffer(hidden, weight)
        for start in range(0, hidden.shape[0], step):
            sl = slice(start, start + step)
            z = logits_block(hidden[sl], weight, bias, out=block(min(step, hidden.shape[0])))
            chunk_grads = [None if g is None else g[sl] for g in grads]
            ent = None if entropy is None else entropy[sl]
            acc.add(sl, self.rows.grad_(z, targets[sl], lse[sl], ent, *chunk_grads, opts))
        return acc.result()

    def forward_backward(self, hidden, weight, bias, targets, opts: LogitOptions, upstream: Upstream, needs,
                         *, bounds=None):
        """Statistics and gradients in one sweep, when the upstream gradient of each chunk follows
        from that chunk's own statistics: 3 vocab projections instead of 4.

        bounds: optional explicit chunks, (start, stop) row ranges covering [0, N) in order, e.g.
        whole sequences (or pairs) per chunk so that `upstream` can evaluate a per-sequence loss;
        `upstream` is then called once per range, in that order. Default: `opts.chunk_rows` rows."""
        n, cdtype = hidden.shape[0], compute_dtype(hidden.dtype)
        out = _empty_stats(n, opts, cdtype, hidden.device)
        acc = _GradAccumulator(hidden, weight, bias, needs, opts.grad_filter_eps)
        step = opts.chunk_rows(weight.shape[0], cdtype)
        ranges = ((s, s + step) for s in range(0, n, step)) if bounds is None else bounds
        block = _BlockBuffer(hidden, weight)
        for start, stop in ranges:
            sl = slice(start, stop)
            z = logits_block(hidden[sl], weight, bias, out=block(min(stop, n) - start))
            st, dz = self._stats_grad_(z, targets[sl], opts, upstream)
            _store(out, sl, st)
            acc.add(sl, dz)
        return out, acc.result()

    def _stats_grad_(self, z, targets, opts, upstream):
        fused = getattr(self.rows, "stats_grad_", None)  # optional: one row kernel for both steps
        if fused is not None:
            return fused(z, targets, opts, upstream)
        st = self.rows.stats(z, targets, opts)
        return st, self.rows.grad_(z, targets, st.lse, st.entropy, *upstream(st), opts)


class _GradAccumulator:
    """grad_hidden rows, and grad_weight / grad_bias summed over chunks in the accumulation dtype.

    The first chunk's product allocates grad_weight (`mm`) instead of adding into zeros: that saves
    writing and re-reading a [V, H] buffer, ~2% of a CPU backward at Llama-3's head size."""

    def __init__(self, hidden, weight, bias, needs, grad_filter_eps: float | None = None):
        self.hidden, self.weight, self.eps = hidden, weight, grad_filter_eps
        self.cdtype = compute_dtype(hidden.dtype)
        self.need_h, self.need_w, self.need_b = needs[0], needs[1], needs[2] and bias is not None
        self.gh = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if self.need_h else None
        self.gw = self.gb = None
        self.bias_dtype = None if bias is None else bias.dtype

    def add(self, sl: slice, dz: torch.Tensor) -> None:
        if self.eps is not None:
            kept = (dz.abs().amax(dim=0) >= self.eps).nonzero().squeeze(1)
            if kept.numel() < dz.shape[1]:
                return self._add_columns(sl, dz, kept)
        if self.need_h:
            torch.mm(dz.to(self.hidden.dtype), self.weight, out=self.gh[sl])
        if self.need_w:  # low-precision inputs: this product runs in fp32 (exact accumulation)
            h = self.hidden[sl].to(self.cdtype)
            self.gw = torch.mm(dz.t(), h) if self.gw is None else self.gw.addmm_(dz.t(), h)
        if self.need_b:
            self.gb = dz.sum(dim=0) if self.gb is None else self.gb.add_(dz.sum(dim=0))

    def _add_columns(self, sl: slice, dz: torch.Tensor, kept: torch.Tensor) -> None:
        """`add` with the vocab columns outside `kept` taken as zero: the products shrink to them."""
        dz = dz.index_select(1, kept)
        if self.need_h:
            torch.mm(dz.to(self.hidden.dtype), self.weight.index_select(0, kept), out=self.gh[sl])
        if self.need_w:
            if self.gw is None:
                self.gw = torch.zeros(self.weight.shape, dtype=self.cdtype, device=self.weight.device)
            self.gw.index_add_(0, kept, torch.mm(dz.t(), self.hidden[sl].to(self.cdtype)))
        if self.need_b:
            if self.gb is None:
                self.gb = torch.zeros(self.weight.shape[0], dtype=self.cdtype, device=self.weight.device)
            self.gb.index_add_(0, kept, dz.sum(dim=0))

    def result(self):
        vocab, device = self.weight.shape[0], self.weight.device
        gw = gb = None
        if self.need_w:
            gw = (torch.zeros_like(self.weight) if self.gw is None else self.gw.to(self.weight.dtype))
        if self.need_b:
            gb = (torch.zeros(vocab, dtype=self.bias_dtype, device=device) if self.gb is None
                  else self.gb.to(self.bias_dtype))
        return self.gh, gw, gb


def _empty_stats(n: int, opts: LogitOptions, dtype, device) -> RowStats:
    def empty():
        return torch.empty(n, dtype=dtype, device=device)

    return RowStats(empty(), empty() if opts.with_entropy else None, empty(),
                    empty() if opts.with_zmean else None)


def _store(out: RowStats, sl: slice, st: RowStats) -> None:
    for dst, src in zip(out, st):
        if dst is not None:
            dst[sl] = src
