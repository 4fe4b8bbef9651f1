"""The shared base of the fused losses: hidden states in, loss out, the [N, V] logits never exist.

A fused loss is `LinearLossBase` plus one *formula*: a function from a `SequenceBatch` (the
policy's token log-probs of some whole sequences, [b, T], the rows they are in the batch, the
reference log-probs of those rows) to `(loss, metrics)`, usually a call to the functional loss.
The base does everything else:

- compacts the non-ignored tokens, so prompts and padding cost no vocab projection;
- the reference side: one no-grad vocab projection (`ref_hidden` + `ref_weight`), or the
  precomputed reference log-probs, per sequence [B] or per token [B, T];
- the policy side, on the backends with a fused forward-backward (`chunked`, `cpp`, `cuda`)
  when a gradient is wanted: whole *units* (a sequence; a chosen/rejected pair for the
  preference losses) are packed into chunks of at most `chunk_rows` tokens (a longer unit is a
  chunk of its own) and `ChunkedLogProbs.forward_backward` runs over those bounds. Per chunk, one
  projection gives the log-probs; the formula, evaluated on a leaf copy of that chunk's log-probs, gives
  ∂loss/∂logprob (and ∂loss/∂entropy) by autograd on [b, T]-sized tensors; two more
  projections push it into grad_hidden and grad_weight. **3 projections**, the gradient
  computed in the forward and only scaled in the backward (as `linear_cross_entropy` does).
  A unit longer than a chunk keeps to the byte budget: its rows past the first chunk's worth
  take a 4th projection (a statistics pass before the unit's loss is known). Another term of the
  loss whose per-token weights are known up front can ride along on the native backends (`extra`:
  PPO's full-vocabulary KL, from a reference block beside each chunk's policy block);
- otherwise (`triton`, `reference`, a batch-coupled formula, or no gradient wanted):
  `logprob_stats` with autograd (1 projection forward, 3 backward) and the formula on the
  whole batch: **4 projections** with a gradient, 1 without.

A formula must be a sum over units whose normaliser comes from the whole batch
(`SequenceBatch.total_tokens`, `total_rows`, or the `token_share` / `row_share` that rescale a
functional loss's own chunk-local mean): then the per-chunk gradients are exact. The loss value
and the metrics are always those of the formula on the whole batch.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from alignfast.ops.gradient_in_forward import GradientInForward
from alignfast.ops.logprobs import implementation, logprob_stats, make_options
from alignfast.ops.options import LogitOptions, compute_dtype
from alignfast.ops.validation import require_tensor

Metrics = dict[str, torch.Tensor]


@dataclass(frozen=True)
class SequenceBatch:
    """What a formula sees: some whole rows of the batch (all of them for the final value).

    logps:   [b, T] policy log-probs of the targets, 0 at ignored positions (differentiable).
    entropy: [b, T] policy entropies, 0 at ignored positions, or None if not asked for.
    mask:    [b, T] bool, the non-ignored positions.
    rows:    [b] the rows of the full batch these are; for paired losses the chosen rows of
             some pairs, then the rejected rows of the same pairs, in the same order.
    ref:     [b, T] reference token log-probs (0 at ignored positions), [b] reference sequence
             log-probs, or None.
    total_tokens, total_rows: counts over the whole batch (the global normalisers).
    """

    logps: torch.Tensor
    entropy: torch.Tensor | None
    mask: torch.Tensor
    rows: torch.Tensor
    ref: torch.Tensor | None
    total_tokens: int
    total_rows: int

    def take(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """The rows of a per-row input ([B] or [B, T]) that this batch holds."""
        return None if x is None else x.index_select(0, self.rows)

    def seq_logps(self) -> torch.Tensor:
        """[b] summed log-probs of each sequence's targets."""
        return self.logps.sum(-1)

    def lengths(self) -> torch.Tensor:
        """[b] number of non-ignored tokens of each sequence."""
        return self.mask.sum(-1)

    def ref_seq_logps(self) -> torch.Tensor:
        if self.ref is None:
            raise ValueError("this loss needs the reference: pass ref_hidden + ref_weight or ref_logps")
        return self.ref.sum(-1) if self.ref.dim() == 2 else self.ref

    def ref_token_logps(self) -> torch.Tensor:
        if self.ref is None or self.ref.dim() != 2:
            raise ValueError("this loss needs per-token reference log-probs: pass ref_hidden + ref_weight "
                             "or ref_logps shaped like labels [B, T]")
        return self.ref

    @property
    def token_share(self) -> float:
        """This batch's share of the batch's tokens: rescales a functional token-mean to the global one."""
        return int(self.mask.sum()) / max(self.total_tokens, 1)

    @property
    def row_share(self) -> float:
        """This batch's share of the batch's rows: rescales a functional per-row mean to the global one."""
        return self.mask.shape[0] / max(self.total_rows, 1)

    @staticmethod
    def halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) halves of a per-row tensor of a paired batch."""
        n = x.shape[0] // 2
        return x[:n], x[n:]


Formula = Callable[[SequenceBatch], "tuple[torch.Tensor, Metrics]"]


class LinearLossBase(nn.Module):
    """Streams the policy (and reference) log-probs over tokens and vocab for a method's formula.

    Subclasses set `unit` and call `self._loss(formula, ...)` from their `forward`:
      unit = "sequence": chunks hold whole sequences (the formula may reduce over a sequence);
             "pair":     chunks hold whole chosen/rejected pairs (rows i and B/2 + i);
             "token":    the formula is a sum over tokens: chunks are any token ranges, and a
                         chunk's batch is the flat [1, n] of its tokens (no `rows`).

    Every subclass takes ignore_index, temperature, softcap, backend, chunk_size and
    grad_filter_eps (the policy's backward only), as in `linear_logprobs`.
    """

    unit = "sequence"

    def __init_subclass__(cls, **kwargs):
        # Every fused loss is one opaque call to torch.compile, as the public ops are (README,
        # torch.compile): tracing its chunk loop would specialise the graph on each batch's token count.
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__:
            cls.forward = torch.compiler.disable(cls.forward)

    def __init__(self, *, ignore_index: int = -100, temperature: float = 1.0, softcap: float | None = None,
                 backend: str = "auto", chunk_size: int | None = None, grad_filter_eps: float | None = None):
        super().__init__()
        self.grad_filter_eps = grad_filter_eps
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.softcap = softcap
        self.backend = backend
        self.chunk_size = chunk_size

    # --- the driver -------------------------------------------------------------------------
    def _loss(self, formula: Formula, hidden, weight, bias, labels, *, ref_hidden=None, ref_weight=None,
              ref_bias=None, ref_logps=None, with_entropy: bool = False, ref_per_token: bool = False,
              separable: bool = True, token_sum: bool = False, extra=None):
        """(loss, metrics) of `formula` on the policy's log-probs of `labels`.

        hidden [B, T, H], weight [V, H], bias [V] | None, labels [B, T] (ignore_index to skip);
        the reference from ref_hidden [B, T, H] + ref_weight [V, H] (+ ref_bias), or ref_logps
        [B] / [B, T]; `ref_per_token`: the formula needs the reference per token; `separable`: False
        when the formula couples the units of the batch (sorting, batch statistics), which rules out
        per-chunk gradients. `token_sum`: the formula is a sum over tokens with a batch-wide normaliser
        (`token_share`: PPO's token-mean, GRPO's dapo/bnpo), so a sequence may be split between chunks at
        any token (a long completion costs 3 projections per row, not 4 past its first chunk's worth).
        `extra`: another term of the loss that can ride along the fused pass
        (`ops.kl.FusedKLPenalty`: `supports(backend)`, `blocks`, `bind(index)`, `total()`); it joins the
        loss only where it was bound (the fused path on a backend it supports): the caller checks
        `extra.index is not None` and otherwise adds the term itself.
        """
        check_batch(hidden, labels, self.unit)
        opts = make_options(hidden, weight, labels, bias, temperature=self.temperature, softcap=self.softcap,
                            ignore_index=self.ignore_index, backend=self.backend, chunk_size=self.chunk_size,
                            with_entropy=with_entropy, grad_filter_eps=self.grad_filter_eps)
        mask = labels != self.ignore_index
        ref = self._reference(labels, mask, weight.shape[0], ref_hidden, ref_weight, ref_bias, ref_logps,
                              ref_per_token)
        whole = SequenceBatch(logps=None, entropy=None, mask=mask,  # type: ignore[arg-type]
                              rows=torch.arange(labels.shape[0], device=labels.device), ref=ref,
                              total_tokens=int(mask.sum()), total_rows=labels.shape[0])
        flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)

        tensors = (hidden, weight) + (() if bias is None else (bias,))
        wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        if wants_grad and separable and _has_forward_backward(opts.backend):
            # grad_filter_eps thins the policy's gradient only (the filter sees the blocks the pass adds)
            carried = extra is not None and extra.supports(opts.backend) and opts.grad_filter_eps is None
            if carried:
                opts = replace(opts, blocks=extra.blocks)
            plan = _FusedPass.plan(self.unit, formula, whole, opts, weight.shape[0], hidden.dtype, token_sum)
            plan.extra = extra.bind(plan.index) if carried else None
            loss = _FusedPolicyLoss.apply(flat_h.index_select(0, plan.index), weight, bias,
                                          flat_t.index_select(0, plan.index), opts, plan)
            return loss, plan.metrics

        # 4-projection path: autograd through LinearLogProbsFunction, then the formula on everything.
        st = logprob_stats(flat_h, weight, bias, flat_t, opts, self.ignore_index)
        shape = labels.shape
        batch = replace(whole, logps=st.logprob.view(shape),
                        entropy=st.entropy.view(shape) if with_entropy else None)
        loss, metrics = formula(batch)
        return loss, _detached(metrics)

    def token_logps_no_grad(self, hidden, weight, bias, labels, *, names=("hidden", "labels")) -> torch.Tensor:
        """[B, T] log-probs of `labels` (0 at ignored positions), one streamed projection, no gradient.
        `names`: what the caller calls hidden and labels, for its error messages."""
        require_tensor(names[0], hidden)
        require_tensor(names[1], labels)
        if hidden.dim() != 3 or hidden.shape[:-1] != labels.shape:
            raise ValueError(f"{names[0]} {tuple(hidden.shape)} does not match {names[1]} {tuple(labels.shape)} "
                             f"(expected [B, T, H] and [B, T])")
        opts = make_options(hidden, weight, labels, bias, temperature=self.temperature, softcap=self.softcap,
                            ignore_index=self.ignore_index, backend=self.backend, chunk_size=self.chunk_size)
        with torch.no_grad():
            st = logprob_stats(hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1), opts,
                               self.ignore_index)
        return st.logprob.view(labels.shape)

    def _reference(self, labels, mask, vocab: int, ref_hidden, ref_weight, ref_bias, ref_logps, per_token: bool):
        """Reference log-probs: [B, T] (0 at ignored positions) or [B]; one no-grad projection."""
        if ref_hidden is not None or ref_weight is not None:
            if ref_hidden is None or ref_weight is None:
                raise ValueError("pass both ref_hidden and ref_weight (or precomputed ref_logps)")
            if ref_logps is not None:
                raise ValueError("pass either ref_hidden + ref_weight or ref_logps, not both")
            require_tensor("ref_weight", ref_weight)
            if ref_weight.dim() != 2 or ref_weight.shape[0] != vocab:
                raise ValueError(f"ref_weight {tuple(ref_weight.shape)} must be [V, H_ref] with the policy's "
                                 f"vocabulary V={vocab}")
            require_tensor("ref_hidden", ref_hidden)
            if ref_hidden.shape[:-1] != labels.shape:
                raise ValueError(f"ref_hidden {tuple(ref_hidden.shape)} does not match labels {tuple(labels.shape)}")
            return self.token_logps_no_grad(ref_hidden, ref_weight, ref_bias, labels, names=("ref_hidden", "labels"))
        if ref_logps is None:
            return None
        require_tensor("ref_logps", ref_logps)
        ref_logps = ref_logps.detach()
        if ref_logps.shape == labels.shape:
            return torch.where(mask, ref_logps, ref_logps.new_zeros(()))
        if per_token or ref_logps.shape != labels.shape[:1]:
            want = f"{tuple(labels.shape)}" + ("" if per_token else f" or {tuple(labels.shape[:1])}")
            raise ValueError(f"ref_logps has shape {tuple(ref_logps.shape)}; expected {want}")
        return ref_logps


def check_batch(hidden, labels, unit: str) -> None:
    require_tensor("hidden", hidden)
    require_tensor("labels", labels)
    if hidden.dim() != 3 or labels.dim() != 2 or hidden.shape[:2] != labels.shape:
        raise ValueError(f"expected hidden [B, T, H] and labels [B, T]; got hidden {tuple(hidden.shape)} and "
                         f"labels {tuple(labels.shape)}")
    if unit == "pair" and labels.shape[0] % 2:
        raise ValueError(f"a paired loss needs chosen and rejected rows concatenated along B (chosen first); "
                         f"got an odd batch of {labels.shape[0]} rows")


def _has_forward_backward(backend: str) -> bool:
    if backend == "reference":
        return False
    return hasattr(implementation(backend), "forward_backward")


def _detached(metrics: Metrics) -> Metrics:
    return {k: v.detach() for k, v in metrics.items()}


class _FusedPass:
    """The chunk plan of one fused forward-backward, and its per-chunk upstream gradients."""

    def __init__(self, formula: Formula, whole: SequenceBatch, index, bounds, chunk_rows, with_entropy,
                 chunk_masks=None):
        self.formula, self.whole = formula, whole
        self.index = index            # [n] flat positions of the valid tokens, in chunk order
        self.bounds = bounds          # [(start, stop)] token ranges of the chunks
        self.chunk_rows = chunk_rows  # per chunk: [b] rows of the batch, or None for token chunks
        self.chunk_masks = chunk_masks  # per chunk: [b, T] its tokens of those rows (split sequences), or None
        self.with_entropy = with_entropy
        self.extra = None             # another term riding along the pass (`LinearLossBase._loss`)
        self._next = 0
        self.metrics: Metrics = {}

    @classmethod
    def plan(cls, unit, formula, whole: SequenceBatch, opts: LogitOptions, vocab, dtype,
             token_sum: bool = False) -> "_FusedPass":
        """Chunks of whole units of at most `chunk_rows` tokens; a longer unit is a chunk of its own,
        which `forward_backward` runs in blocks within the budget (`ChunkedLogProbs._long_range`).
        `token_sum` (sequence units): chunks of `chunk_rows` tokens in row order, sequences split where
        a chunk ends; each chunk's formula sees the rows it touches, masked to its own tokens."""
        step = opts.chunk_rows(vocab, compute_dtype(dtype))
        mask = whole.mask
        n_rows, seq_len = mask.shape
        flat_pos = torch.arange(n_rows * seq_len, device=mask.device).view(n_rows, seq_len)
        if unit == "token" or (unit == "sequence" and token_sum):
            index = flat_pos[mask]
            n = index.numel()
            bounds = [(s, min(s + step, n)) for s in range(0, n, step)]
            if unit == "token":
                return cls(formula, whole, index, bounds, [None] * len(bounds), opts.with_entropy)
            rows, masks = [], []
            for start, stop in bounds:
                positions = index[start:stop]
                chunk_rows = torch.unique_consecutive(positions // seq_len)
                own = torch.zeros(n_rows * seq_len, dtype=torch.bool, device=mask.device)
                own[positions] = True
                rows.append(chunk_rows)
                masks.append(own.view(n_rows, seq_len).index_select(0, chunk_rows))
            return cls(formula, whole, index, bounds, rows, opts.with_entropy, masks)

        counts = mask.sum(-1).tolist()
        units = [(i, n_rows // 2 + i) for i in range(n_rows // 2)] if unit == "pair" else [(i,) for i in range(n_rows)]
        chunks, current, size = [], [], 0
        for u in units:
            length = sum(counts[r] for r in u)
            if length == 0:
                continue  # no tokens, no gradient (its constant part of the loss is in the final value)
            if current and size + length > step:
                chunks.append(current)
                current, size = [], 0
            current.append(u)
            size += length
        if current:
            chunks.append(current)

        rows_per_chunk, bounds, start = [], [], 0
        for chunk in chunks:  # slot-major: the chosen rows of the chunk's pairs, then their rejected rows
            rows = torch.tensor([u[k] for k in range(len(chunk[0])) for u in chunk], device=mask.device)
            stop = start + sum(counts[r] for r in rows.tolist())
            rows_per_chunk.append(rows)
            bounds.append((start, stop))
            start = stop
        if rows_per_chunk:
            order = torch.cat(rows_per_chunk)
            index = flat_pos.index_select(0, order)[mask.index_select(0, order)]
        else:
            index = flat_pos.new_zeros(0)
        return cls(formula, whole, index, bounds, rows_per_chunk, opts.with_entropy)

    def upstream(self, st):
        """(g_logprob, g_entropy, g_lse, g_zmean) of the loss for the next chunk's tokens."""
        k = self._next
        self._next += 1
        with torch.enable_grad():
            lp = st.logprob.detach().requires_grad_()
            ent = st.entropy.detach().requires_grad_() if self.with_entropy else None
            batch = self._batch(k, lp, ent)
            loss, _ = self.formula(batch)
            leaves = [lp] + ([ent] if ent is not None else [])
            grads = (torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad
                     else [None] * len(leaves))
        g_lp = grads[0] if grads[0] is not None else torch.zeros_like(lp)
        g_ent = grads[1] if ent is not None else None  # None: the loss does not depend on the entropy
        return g_lp.detach(), None if g_ent is None else g_ent.detach(), None, None

    def _batch(self, k: int, lp, ent) -> SequenceBatch:
        """Chunk k's batch: its tokens' log-probs (and entropies) in the rows they belong to."""
        w, rows = self.whole, self.chunk_rows[k]
        if rows is None:  # a token chunk: the flat [1, n] of its tokens
            mask = torch.ones(1, lp.shape[0], dtype=torch.bool, device=lp.device)
            return replace(w, logps=lp[None], entropy=None if ent is None else ent[None], mask=mask,
                           rows=rows, ref=None)
        mask = w.mask.index_select(0, rows) if self.chunk_masks is None else self.chunk_masks[k]
        zeros = lp.new_zeros(mask.shape)
        return replace(w, logps=zeros.masked_scatter(mask, lp),
                       entropy=None if ent is None else zeros.masked_scatter(mask, ent),
                       mask=mask, rows=rows, ref=None if w.ref is None else w.ref.index_select(0, rows))

    def finish(self, st) -> torch.Tensor:
        """The loss on the whole batch (and its metrics), from all the tokens' log-probs."""
        w = self.whole
        n = w.mask.numel()

        def spread(x):
            return x.new_zeros(n).index_copy_(0, self.index, x).view(w.mask.shape)

        with torch.no_grad():
            batch = replace(w, logps=spread(st.logprob), entropy=spread(st.entropy) if self.with_entropy else None)
            loss, metrics = self.formula(batch)
        self.metrics = _detached(metrics)
        return loss.detach().to(st.logprob.dtype)


class _FusedPolicyLoss(GradientInForward):
    """(compacted hidden [n, H], weight, bias, targets [n], opts, plan) -> the loss, its gradient
    computed in the forward by `forward_backward` over the plan's chunks, scaled in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, opts: LogitOptions, plan: _FusedPass):
        ctx.num_inputs = 6
        carried = {} if plan.extra is None else {"extra": plan.extra}  # only the native backends take one
        st, grads = implementation(opts.backend).forward_backward(
            hidden, weight, bias, targets, opts, plan.upstream, ctx.needs_input_grad[:3], bounds=plan.bounds,
            **carried)
        GradientInForward.save_gradients(ctx, grads)
        loss = plan.finish(st)
        return loss if plan.extra is None else loss + plan.extra.total().to(loss.dtype)
