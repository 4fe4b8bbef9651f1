"""Sequence packing for SFT: several examples per row, each attending only to itself.

    rows = pack_examples(examples, max_length)           # best-fit decreasing, rows of ≤ max_length tokens
    batch = PackedCollator(pad_token_id)(rows[:8])       # + position_ids restarting at each example
    inputs, labels = packed_inputs(batch, "sdpa")        # the backbone's kwargs, and the labels to shift

Packing changes what is computed only where it must not leak across examples, and never does:

- attention: sdpa / eager (and any other non-flash implementation) get a 4D block-diagonal causal mask
  [B, 1, T, T] (a query attends to the keys of its own example at or before it); flash-attention
  implementations get no mask and one padding-free row [1, N] with `position_ids`, from which they
  derive the per-example `cu_seqlens` (varlen kernels, no padding computed at all);
- positions: `position_ids` restart at 0 at each example's first token (RoPE sees what it sees unpacked);
- targets: the label of each example's first token is -100, so the last state of one example is
  never trained to predict the first token of the next (unpacked, that token is never a target either).

The loss and its normaliser (completion tokens of the global batch) are therefore those of the same
examples unpacked, up to fp32 rounding. Only `per_device_batch_size` changes meaning: it counts rows.
"""
from __future__ import annotations

import logging

import torch

from alignfast.data.collators import IGNORE_INDEX, pad
from alignfast.data.encode import truncate

logger = logging.getLogger(__name__)


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of indices into `lengths`, each summing to at most `capacity` (every length ≤ capacity):
    longest first, each into the fullest bin it still fits in, else a new bin. Deterministic.

    The bins with free space s are kept per s, and the set of occupied s as the bits of one integer,
    so the best fit (the smallest s ≥ length) is one shift and lowest-set-bit of a capacity-bit
    integer: O(n log n + n · capacity / 64) overall."""
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    too_long = [(i, n) for i, n in enumerate(lengths) if not 0 <= n <= capacity]
    if too_long:
        raise ValueError(f"lengths must be in [0, {capacity}]: (index, length) {too_long[:5]}")
    bins: list[list[int]] = []
    by_space: dict[int, list[int]] = {}  # free space -> bins with exactly that much left
    occupied = 0  # bit s set <=> by_space[s] is non-empty
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        fits = occupied >> n
        if fits:
            space = n + (fits & -fits).bit_length() - 1
            b = by_space[space].pop()
            if not by_space[space]:
                occupied &= ~(1 << space)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        left = space - n
        if left > 0:
            by_space.setdefault(left, []).append(b)
            occupied |= 1 << left
    return bins


def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """SFT examples ({"prompt_ids", "completion_ids"}) -> packed rows {"examples": [example, ...]} of at
    most `max_length` tokens. An example longer than max_length is truncated as `encode.truncate` does
    (the completion's end first, then the prompt's start)."""
    fitted = []
    for e in examples:
        p, c = truncate(e["prompt_ids"], e["completion_ids"], max_length)
        fitted.append(e if (p, c) == (e["prompt_ids"], e["completion_ids"]) else
                      {**e, "prompt_ids": p, "completion_ids": c})
    lengths = [len(e["prompt_ids"]) + len(e["completion_ids"]) for e in fitted]
    rows = [{"examples": [fitted[i] for i in b]} for b in best_fit_decreasing(lengths, max_length)]
    if rows:
        logger.info("packed %d examples into %d rows of <= %d tokens (%.0f%% filled)", len(fitted), len(rows),
                    max_length, 100.0 * sum(lengths) / (len(rows) * max_length))
    return rows


class PackedCollator:
    """Packed rows -> input_ids, attention_mask (1 on tokens, 0 on padding), labels (prompt masked unless
    completion_only=False; each example's first token -100) and position_ids (0, 1, ... per example;
    0 on padding), all [B, T], padded on the right to the longest row."""

    def __init__(self, pad_token_id: int, completion_only: bool = True):
        self.pad_token_id, self.completion_only = pad_token_id, completion_only

    def __call__(self, rows):
        ids, labels, positions = [], [], []
        for row in rows:
            r_ids, r_labels, r_pos = [], [], []
            for e in row["examples"]:
                p, c = e["prompt_ids"], e["completion_ids"]
                lab = ([IGNORE_INDEX] * len(p) if self.completion_only else list(p)) + list(c)
                lab[0] = IGNORE_INDEX  # predicted from nothing of its own example: never a target
                r_ids += p + c
                r_labels += lab
                r_pos += range(len(p) + len(c))
            ids.append(r_ids)
            labels.append(r_labels)
            positions.append(r_pos)
        return {"input_ids": pad(ids, self.pad_token_id), "labels": pad(labels, IGNORE_INDEX),
                "attention_mask": pad([[1] * len(r) for r in ids], 0), "position_ids": pad(positions, 0)}


def block_causal_mask(position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] position_ids (0 at each example's start) and 2D attention_mask -> [B, 1, T, T] bool, True
    where query q may attend key k: same example and k ≤ q. Padding forms one more block (causal
    among itself), so no row of the mask is empty (an all-masked row is NaN in softmax)."""
    if position_ids.shape != attention_mask.shape or position_ids.dim() != 2:
        raise ValueError(f"position_ids {tuple(position_ids.shape)} and attention_mask "
                         f"{tuple(attention_mask.shape)} must be the same [B, T]")
    segment = torch.cumsum(position_ids == 0, dim=1).masked_fill(attention_mask == 0, 0)
    t = position_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    return ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]


def is_flash(attn_implementation: str | None) -> bool:
    """flash_attention_2/3 and hub flash kernels: varlen attention from position_ids, no mask."""
    return "flash" in (attn_implementation or "")


def packed_inputs(batch: dict, attn_implementation: str | None) -> tuple[dict, torch.Tensor]:
    """(kwargs of the backbone's forward, labels [B', T'] to shift) for a `PackedCollator` batch.

    flash: padding-free — the batch's tokens as one row [1, N], `position_ids` only (the kernels
    find the example boundaries where the positions restart; the first-token labels are already -100,
    so shifting across a row's end is harmless). Untested here: it needs flash_attn on a GPU.
    otherwise (sdpa, eager, ...): the padded rows and a 4D block-diagonal causal mask — bool for sdpa
    (True: attend), additive float32 (0 / finfo.min) for the implementations that add it to the scores."""
    if is_flash(attn_implementation):
        keep = batch["attention_mask"].bool()
        flat = {k: batch[k][keep][None] for k in ("input_ids", "position_ids", "labels")}
        return {"input_ids": flat["input_ids"], "attention_mask": None,
                "position_ids": flat["position_ids"]}, flat["labels"]
    mask = block_causal_mask(batch["position_ids"], batch["attention_mask"])
    if attn_implementation != "sdpa":
        mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(
            ~mask, torch.finfo(torch.float32).min)
    return {"input_ids": batch["input_ids"], "attention_mask": mask,
            "position_ids": batch["position_ids"]}, batch["labels"]
