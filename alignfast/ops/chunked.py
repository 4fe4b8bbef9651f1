"""The chunked driver shared by the `chunked`, `cpp` and `cuda` backends.

`forward` and `backward` run over [rows, cols] blocks of logits (`LogitOptions.block_shape`): all
tokens by as many vocab columns as fit a byte budget. One BLAS call makes a block and a row kernel
(`alignfast.ops.rowwise` in PyTorch, or `alignfast.ops.native_rows` in C++/CUDA) reduces it: the
forward merges the slices' statistics per row (`_merge_slices`); the backward knows each row's lse
(and entropy) from the forward, so the kernel turns each block into ∂L/∂z in place and two more
BLAS calls push it to `hidden` and `weight`. Every product has N as a dimension and each row of the
head and of its gradient is touched once per pass. When the upstream gradient is known in the
forward (mean/sum cross-entropy, the fused losses), `forward_backward` does both in one sweep of
token chunks of whole rows (the gradient needs the row's lse before any of it can be formed).
The [N, V] logits never exist.

Vocab projections per call: forward 1; backward 3 (recompute, grad_hidden, grad_weight);
`forward_backward` 3 (plus 1 for the rows of a range longer than a block beyond its first block).
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch

from alignfast.ops.options import LogitOptions, compute_dtype
from alignfast.ops.rowwise import RowStats, tempered

# (g_logprob, g_entropy, g_lse, g_zmean) for one chunk, from that chunk's statistics.
Upstream = Callable[[RowStats], tuple]
# An extra term of the loss riding along `forward_backward`: (rows, their raw logits block z, left as it
# is) -> its gradient on z in a block of its own, added to the pass's (or None: nothing to add).
Extra = Callable[[slice, torch.Tensor], "torch.Tensor | None"]


def logits_block(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 out: torch.Tensor | None = None, *, vocab_major: bool = False) -> torch.Tensor:
    """Raw logits h·Wᵀ + b of a chunk of tokens, [rows, V] in the accumulation dtype.

    out: a reused flat buffer (≥ rows·V elements, that dtype) to write them into (`_BlockBuffer`).
    vocab_major: form the [V, rows] product W·hᵀ (+ b) and return its transpose, a [rows, V] view
    that the native CPU kernels and every product below read as is (see `ChunkedLogProbs._logits`)."""
    cdtype = compute_dtype(hidden.dtype)
    rows, vocab = hidden.shape[0], weight.shape[0]
    a, b = (weight, hidden) if vocab_major else (hidden, weight)
    if bias is not None and vocab_major:
        bias = bias[:, None]
    dst = None if out is None else out[: rows * vocab].view((vocab, rows) if vocab_major else (rows, vocab))
    if dst is not None and hidden.dtype == cdtype:
        z = torch.mm(a, b.t(), out=dst) if bias is None else torch.addmm(bias, a, b.t(), out=dst)
    else:
        z = torch.mm(a, b.t()) if bias is None else torch.addmm(bias, a, b.t())
        z = z.to(cdtype) if dst is None else dst.copy_(z)
    return z.t() if vocab_major else z


class _BlockBuffer:
    """The flat logits buffer of one pass (room for [rows, V]), reused by every chunk. A fresh block
    per chunk would pay its page faults again each time on CPU (≈0.2 s of kernel time per 256 MiB
    block: as much as the native row kernels' whole work on it), and briefly hold two blocks."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor):
        self.vocab, self.dtype, self.device = weight.shape[0], compute_dtype(hidden.dtype), hidden.device
        self.buf = None

    def __call__(self, rows: int) -> torch.Tensor:
        if self.buf is None or self.buf.numel() < rows * self.vocab:
            self.buf = None
            self.buf = torch.empty(rows * self.vocab, dtype=self.dtype, device=self.device)
        return self.buf


class ChunkedLogProbs:
    """Forward, backward and fused forward-backward over token chunks, for one row-kernel set.

    rows: a module with `stats(z, targets, opts)` and `grad_(z, targets, ...)`; vocab_major: its
    kernels also read [rows, V] blocks stored as [V, rows] (`logits_block`), on CPU tensors."""

    def __init__(self, rows, *, vocab_major: bool = False):
        self.rows, self.vocab_major = rows, vocab_major

    def _logits(self, hidden, weight, bias, out, *, whole_vocab: bool = True, row_major: bool = False) -> torch.Tensor:
        """`logits_block`, vocab-major where asked (`cpu_layout`) for a block spanning the whole
        vocabulary (a token chunk) on a CPU; vocab slices of all tokens stay row-major: there the
        layout gained nothing and grad_hidden's product lost ~5% (MKL on a Xeon, slices of
        4096 × 16384: benchmarks/results/cpu-layouts/). `row_major`: always (an extra term's kernels
        read it)."""
        vocab_major = self.vocab_major and whole_vocab and not row_major and hidden.device.type == "cpu"
        return logits_block(hidden, weight, bias, out=out, vocab_major=vocab_major)

    def forward(self, hidden, weight, bias, targets, opts: LogitOptions, *, buf=None) -> RowStats:
        """Per-token statistics over the backward's [rows, cols] blocks (`LogitOptions.block_shape`):
        each vocab slice's statistics are merged per row (`_merge_slices`), so every product has N as a
        dimension and the head is read once per row chunk, not once per chunk of whole-row tokens.

        buf: optional flat workspace in the accumulation dtype to hold the blocks (narrower slices
        if it is smaller than a block), so a caller that already holds one stays within the budget."""
        n, vocab, cdtype = hidden.shape[0], weight.shape[0], compute_dtype(hidden.dtype)
        out = _empty_stats(n, opts, cdtype, hidden.device)
        rows, cols = opts.block_shape(n, vocab, cdtype)
        if buf is None:
            buf = torch.empty(min(rows, n) * cols, dtype=cdtype, device=hidden.device)
        else:
            cols = max(1, min(cols, buf.numel() // max(min(rows, n), 1)))
        for start in range(0, n, rows):
            sl = slice(start, start + rows)
            h, t = hidden[sl], targets[sl]
            parts = []
            for v0 in range(0, vocab, cols):
                vs = slice(v0, min(v0 + cols, vocab))
                b = None if bias is None else bias[vs]
                z = self._logits(h, weight[vs], b, buf, whole_vocab=cols >= vocab)
                local = t - v0
                hit = ((local >= 0) & (local < z.shape[1])).nonzero().squeeze(1)
                z_t = z[hit, local[hit]]   # raw target logits, before a row kernel that overwrites them
                st = self.rows.stats(z, local.clamp(0, z.shape[1] - 1), opts)
                parts.append(_SliceStats(st, z_t, hit, z.shape[1]))
            _store(out, sl, _merge_slices(parts, vocab, opts))   # one slice: its own statistics
        return out

    def backward(self, hidden, weight, bias, targets, lse, entropy, grads, opts: LogitOptions, needs):
        """grads = (g_logprob, g_entropy, g_lse, g_zmean), each [N] or None; needs = which of
        (hidden, weight, bias) want a gradient. lse and entropy are known from the forward, so the
        blocks can be vocab slices ([N, cols], `LogitOptions.block_shape`): no online reduction."""
        n, vocab, cdtype = hidden.shape[0], weight.shape[0], compute_dtype(hidden.dtype)
        rows, cols = opts.block_shape(n, vocab, cdtype)
        acc = _GradAccumulator(hidden, weight, bias, needs, opts.grad_filter_eps, whole_rows=cols >= vocab)
        buf = torch.empty(min(rows, n) * cols, dtype=cdtype, device=hidden.device)
        for start in range(0, n, rows):
            sl = slice(start, start + rows)
            row_args = [targets[sl], lse[sl], None if entropy is None else entropy[sl],
                        *(None if g is None else g[sl] for g in grads)]
            h = hidden[sl]
            for v0 in range(0, vocab, cols):
                vs = slice(v0, min(v0 + cols, vocab))
                b = None if bias is None else bias[vs]
                z = self._logits(h, weight[vs], b, buf, whole_vocab=cols >= vocab)
                acc.add(sl, self._grad_columns_(z, vs, vocab, *row_args, opts), vs)
        return acc.result()

    def _grad_columns_(self, z, cols: slice, vocab, targets, lse, entropy, g_logprob, g_entropy, g_lse,
                       g_zmean, opts):
        """`rows.grad_` on the vocab slice `cols` of the rows' logits: the one-hot term is added here,
        where the target falls in the slice, and the mean logit's 1/V is over the whole vocabulary."""
        width = z.shape[1]
        if width == vocab:
            return self.rows.grad_(z, targets, lse, entropy, g_logprob, g_entropy, g_lse, g_zmean, opts)
        local = targets - cols.start
        hit = ((local >= 0) & (local < width)).nonzero().squeeze(1)
        if g_logprob is not None:  # the kernel's p·(g_lse − g_lp) part, without its one-hot term
            z_t = z[hit, local[hit]]   # raw target logits, before the kernel overwrites them
            g_lse = -g_logprob if g_lse is None else g_lse - g_logprob
        if g_zmean is not None:
            g_zmean = g_zmean * (width / vocab)
        dz = self.rows.grad_(z, local.clamp(0, width - 1), lse, entropy, None, g_entropy, g_lse, g_zmean, opts)
        if g_logprob is not None:
            one_hot = g_logprob.expand(targets.shape[0])[hit] / opts.temperature
            if opts.softcap is not None:
                one_hot = one_hot * (1 - torch.tanh(z_t / opts.softcap).square())
            dz[hit, local[hit]] += one_hot.to(dz.dtype)
        return dz

    def forward_backward(self, hidden, weight, bias, targets, opts: LogitOptions, upstream: Upstream, needs,
                         *, bounds=None, extra: Extra | None = None):
        """Statistics and gradients in one sweep, when the upstream gradient of each chunk follows
        from that chunk's own statistics: 3 vocab projections instead of 4.

        bounds: optional explicit chunks, (start, stop) row ranges covering [0, N) in order, e.g.
        whole sequences (or pairs) per chunk so that `upstream` can evaluate a per-sequence loss;
        `upstream` is then called once per range, in that order. Default: `opts.chunk_rows` rows.
        A range longer than `opts.chunk_rows` stays within the byte budget (`_long_range`).
        extra: another term of the loss whose gradient on each row's logits it forms from the same
        (row-major) block, called once per row, before the row kernels overwrite the block."""
        n, cdtype = hidden.shape[0], compute_dtype(hidden.dtype)
        out = _empty_stats(n, opts, cdtype, hidden.device)
        acc = _GradAccumulator(hidden, weight, bias, needs, opts.grad_filter_eps)
        step = opts.chunk_rows(weight.shape[0], cdtype)
        ranges = ((s, s + step) for s in range(0, n, step)) if bounds is None else bounds
        block = _BlockBuffer(hidden, weight)
        for start, stop in ranges:
            sl = slice(start, min(stop, n))
            if sl.stop - start > step:
                _store(out, sl, self._long_range(hidden, weight, bias, targets, sl, step, opts, upstream, acc, block,
                                                 extra))
                continue
            z = self._logits(hidden[sl], weight, bias, block(sl.stop - start), row_major=extra is not None)
            extra_dz = None if extra is None else extra(sl, z)
            st, dz = self._stats_grad_(z, targets[sl], opts, upstream)
            _store(out, sl, st)
            acc.add(sl, _plus(dz, extra_dz))
        return out, acc.result()

    def _long_range(self, hidden, weight, bias, targets, sl: slice, step: int, opts, upstream, acc,
                    block, extra: Extra | None = None) -> RowStats:
        """One `upstream` range of more than `step` rows (a pair or sequence longer than the byte
        budget's block), in blocks of at most `step` rows: the statistics of the rows after the first
        `step` (a forward pass), then the first block's logits, kept, whose statistics complete the
        range's; `upstream` on the whole range; that block's gradient, then the other blocks'
        recomputed. 3 vocab projections per row plus 1 per row outside the kept block (the
        unchunked alternative, a forward and a recomputing backward, costs 4 per row).
        The kept block comes first so that grad_weight's first write is the range's first rows'."""
        head, rest = slice(sl.start, sl.start + step), slice(sl.start + step, sl.stop)
        rest_stats = self.forward(hidden[rest], weight, bias, targets[rest], opts, buf=block(step))
        whole = {}

        def head_upstream(head_stats):   # the first block's share of the whole range's upstream gradient
            whole["stats"] = _cat_stats(head_stats, rest_stats)
            whole["grads"] = upstream(whole["stats"])
            return tuple(_rows_of(g, slice(0, step)) for g in whole["grads"])

        row_major = extra is not None
        z = self._logits(hidden[head], weight, bias, block(step), row_major=row_major)
        extra_dz = None if extra is None else extra(head, z)
        acc.add(head, _plus(self._stats_grad_(z, targets[head], opts, head_upstream)[1], extra_dz))
        st, grads = whole["stats"], whole["grads"]
        for start in range(rest.start, rest.stop, step):
            part = slice(start, min(start + step, rest.stop))
            local = slice(start - sl.start, part.stop - sl.start)
            z = self._logits(hidden[part], weight, bias, block(part.stop - start), row_major=row_major)
            extra_dz = None if extra is None else extra(part, z)
            dz = self.rows.grad_(z, targets[part], st.lse[local], _rows_of(st.entropy, local),
                                 *(_rows_of(g, local) for g in grads), opts)
            acc.add(part, _plus(dz, extra_dz))
        return st

    def _stats_grad_(self, z, targets, opts, upstream):
        fused = getattr(self.rows, "stats_grad_", None)  # optional: one row kernel for both steps
        if fused is not None:
            return fused(z, targets, opts, upstream)
        st = self.rows.stats(z, targets, opts)
        return st, self.rows.grad_(z, targets, st.lse, st.entropy, *upstream(st), opts)


class _SliceStats(NamedTuple):
    stats: RowStats        # of the rows' logits in one vocab slice (its logprob is not used)
    z_target: torch.Tensor  # raw logits of the targets that fall in the slice
    hit: torch.Tensor       # the rows whose targets those are
    width: int              # the slice's number of vocab columns


def _merge_slices(parts: list[_SliceStats], vocab: int, opts: LogitOptions) -> RowStats:
    """Whole-row statistics from those of the row's vocab slices b: lse = log Σ_b e^{lse_b}; with
    w_b = e^{lse_b − lse} the probability mass of slice b, entropy = Σ_b w_b·(H_b − log w_b) (the
    entropy of a mixture: no difference of large terms); the mean logit weighs each slice by its
    width; logprob = x_t − lse, x_t tempered from the raw target logit of the slice holding it."""
    lse_b = torch.stack([p.stats.lse for p in parts])
    lse = torch.logsumexp(lse_b, dim=0)
    entropy = zmean = None
    if opts.with_entropy:
        log_w = lse_b - lse
        entropy = (log_w.exp() * (torch.stack([p.stats.entropy for p in parts]) - log_w)).sum(dim=0)
    if opts.with_zmean:
        zmean = sum(p.stats.zmean * (p.width / vocab) for p in parts)
    target = torch.zeros_like(lse)
    for p in parts:
        target[p.hit] = tempered(p.z_target.to(lse.dtype), opts, inplace=False)
    return RowStats(target - lse, entropy, lse, zmean)


class _GradAccumulator:
    """grad_hidden, grad_weight and grad_bias from blocks of ∂L/∂z: a [rows, cols] block adds
    dz·W[cols] to grad_hidden[rows], dzᵀ·h[rows] to grad_weight[cols] and Σ dz to grad_bias[cols],
    in the accumulation dtype. The first block of its rows (cols.start == 0) or of its columns
    (rows.start == 0) writes its product instead of adding it: no zero fill, no extra read.

    whole_rows: every block spans the whole vocabulary, so grad_hidden's rows are written once,
    straight in hidden's dtype (the low-precision product stays in bf16/fp16 on tensor cores).
    With `grad_filter_eps`, the vocab columns of a block whose every |dz| is below it are skipped."""

    def __init__(self, hidden, weight, bias, needs, grad_filter_eps: float | None = None, *,
                 whole_rows: bool = True):
        self.hidden, self.weight, self.eps = hidden, weight, grad_filter_eps
        self.cdtype = compute_dtype(hidden.dtype)
        self.need_h, self.need_w, self.need_b = needs[0], needs[1], needs[2] and bias is not None
        # filtered blocks add into zeros; so does an empty batch's result
        alloc = torch.zeros if grad_filter_eps is not None or hidden.shape[0] == 0 else torch.empty
        gh_dtype = hidden.dtype if whole_rows else self.cdtype
        self.gh = alloc(hidden.shape, dtype=gh_dtype, device=hidden.device) if self.need_h else None
        self.gw = alloc(weight.shape, dtype=self.cdtype, device=weight.device) if self.need_w else None
        self.gb = alloc(weight.shape[0], dtype=self.cdtype, device=weight.device) if self.need_b else None
        self.bias_dtype = None if bias is None else bias.dtype

    def add(self, rows: slice, dz: torch.Tensor, cols: slice | None = None) -> None:
        cols = slice(0, self.weight.shape[0]) if cols is None else cols
        w, h = self.weight[cols], self.hidden[rows]
        if self.eps is not None:
            kept = (dz.abs().amax(dim=0) >= self.eps).nonzero().squeeze(1)
            if kept.numel() < dz.shape[1]:
                return self._add_columns(rows, cols, dz, kept)
        first_cols, first_rows = cols.start == 0 and self.eps is None, rows.start == 0 and self.eps is None
        # a low-precision head: its products take dz in the head's dtype (as naive's gradient is), once
        tensor_cores = self.need_w and h.dtype != self.cdtype and low_precision_products(h.device)
        dz_low = dz.to(w.dtype) if self.need_h or tensor_cores else None
        if self.need_h:
            if w.dtype == self.gh.dtype:   # the product lands in grad_hidden directly
                _mm_into(self.gh[rows], dz_low, w, add=not first_cols)
            else:   # a low-precision head over vocab slices: its bf16/fp16 products summed in fp32
                _into(self.gh[rows], torch.mm(dz_low, w), add=not first_cols)
        if tensor_cores:  # bf16/fp16 on a GPU: a low-precision product accumulated in fp32 grad_weight
            _mm_into(self.gw[cols], dz_low.t(), h, add=not first_rows, out_dtype=self.cdtype)
        elif self.need_w:  # an fp32 product: exact accumulation, and the only one a CPU has for bf16 into fp32
            _mm_into(self.gw[cols], dz.t(), h.to(self.cdtype), add=not first_rows)
        if self.need_b:
            _into(self.gb[cols], dz.sum(dim=0), add=not first_rows)

    def _add_columns(self, rows: slice, cols: slice, dz: torch.Tensor, kept: torch.Tensor) -> None:
        """`add` with the vocab columns outside `kept` taken as zero: the products shrink to them."""
        dz = dz.index_select(1, kept)
        if self.need_h:
            w = self.weight[cols].index_select(0, kept)
            self.gh[rows] += torch.mm(dz.to(w.dtype), w).to(self.gh.dtype)
        if self.need_w:
            self.gw[cols].index_add_(0, kept, torch.mm(dz.t(), self.hidden[rows].to(self.cdtype)))
        if self.need_b:
            self.gb[cols].index_add_(0, kept, dz.sum(dim=0))

    def result(self):
        gh = None if self.gh is None else self.gh.to(self.hidden.dtype)
        gw = None if self.gw is None else self.gw.to(self.weight.dtype)
        gb = None if self.gb is None else self.gb.to(self.bias_dtype)
        return gh, gw, gb


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, add: bool, out_dtype=None) -> None:
    """out (+)= a·b; `out_dtype`: a and b in a lower precision than out (fp32 accumulation and result)."""
    if out_dtype is not None:
        if add:
            torch.addmm(out, a, b, out_dtype=out_dtype, out=out)
        else:
            torch.mm(a, b, out_dtype=out_dtype, out=out)
    elif add:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


@functools.cache
def _checked_low_precision_products(device: torch.device) -> bool:
    """Whether this torch multiplies bf16 matrices into an fp32 result, in place, on `device`
    (`aten::addmm.dtype_out`: CUDA only), checked once on small matrices against an fp32 product."""
    try:
        g = torch.Generator(device=device).manual_seed(0)
        a, b = (torch.randn(s, generator=g, device=device).to(torch.bfloat16) for s in ((16, 32), (32, 8)))
        out = torch.randn(16, 8, generator=g, device=device)
        want = out + a.float() @ b.float()
        torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        return bool(torch.allclose(out, want, rtol=1e-3, atol=1e-3))
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def low_precision_products(device: torch.device) -> bool:
    """bf16/fp16 gradient products on tensor cores into fp32 (a GPU; an fp32 GEMM there runs several
    times slower than the rest of the pass); on a CPU the product stays fp32."""
    return device.type == "cuda" and _checked_low_precision_products(device)


def _into(out: torch.Tensor, value: torch.Tensor, *, add: bool) -> None:
    if add:
        out.add_(value)
    else:
        out.copy_(value)


def _empty_stats(n: int, opts: LogitOptions, dtype, device) -> RowStats:
    def empty():
        return torch.empty(n, dtype=dtype, device=device)

    return RowStats(empty(), empty() if opts.with_entropy else None, empty(),
                    empty() if opts.with_zmean else None)


def _plus(dz: torch.Tensor, extra_dz: torch.Tensor | None) -> torch.Tensor:
    return dz if extra_dz is None else dz.add_(extra_dz)


def _rows_of(x: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """Some rows of a per-row tensor; None and 0-dim (broadcast) values pass through."""
    return x if x is None or x.dim() == 0 else x[rows]


def _cat_stats(first: RowStats, second: RowStats) -> RowStats:
    return RowStats(*(None if a is None else torch.cat([a, b]) for a, b in zip(first, second)))


def _store(out: RowStats, sl: slice, st: RowStats) -> None:
    for dst, src in zip(out, st):
        if dst is not None:
            dst[sl] = src
