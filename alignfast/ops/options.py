"""The non-tensor options that travel through autograd, as one frozen dataclass."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

DEFAULT_CHUNK_BYTES = 256 * 2**20
# the backward's blocks are at least this many vocab columns wide (or the whole vocabulary)
MIN_BLOCK_COLS = 4096
# budget-sized block dimensions are rounded down to a multiple of this (one 64-byte line of fp32):
# a BLAS can run a block with an odd leading dimension far slower (MKL on Zen 4: the [V, 523] logits
# product of a token chunk 1.55x its time on all rows, [V, 512] 1.06x)
BLOCK_ALIGN = 16


@dataclass(frozen=True)
class LogitOptions:
    """How logits are formed and which statistics a pass computes.

    logit_v = softcap·tanh((h·w_v + b_v)/softcap) / temperature   (softcap optional)
    """

    temperature: float = 1.0
    softcap: float | None = None
    backend: str = "chunked"
    chunk_size: int | None = None  # tokens per chunk for the chunked paths; None: from the byte budget
    with_entropy: bool = False
    with_zmean: bool = False  # mean tempered logit per row (label smoothing needs it)
    # backward only: vocab columns (chunked/cpp/cuda) or tiles (triton) whose every |dL/dz| is below
    # this skip the gradient products; None keeps the gradients exact
    grad_filter_eps: float | None = None
    # [rows, V] blocks a token chunk holds at once within the budget: 2 when a fused loss's extra term
    # (PPO's full-vocabulary KL) forms the reference's block beside the policy's
    blocks: int = 1

    def chunk_rows(self, vocab: int, dtype: torch.dtype = torch.float32) -> int:
        """Tokens per chunk: `chunk_size`, or as many rows as `blocks` [rows, V] fp32 blocks fit in the budget.

        The budget is ALIGNFAST_CHUNK_BYTES (default 256 MiB) for one block: the native row kernels
        (`cpp`, `cuda`) work in it in place; PyTorch's row math (`chunked`) holds up to two more
        transients (entropy, softcap), so its memory beyond inputs, outputs and gradients is 1-3 blocks.
        Rounded down to a multiple of BLOCK_ALIGN rows when that keeps at least half of them.
        """
        if self.chunk_size is not None:
            return self.chunk_size
        return budget_rows(vocab, dtype, self.blocks)

    def block_shape(self, tokens: int, vocab: int, dtype: torch.dtype = torch.float32) -> tuple[int, int]:
        """(rows, cols) of the backward's [rows, cols] logits blocks, within the same byte budget.

        All tokens by as many vocab columns as fit, so that every product has N as a dimension and
        each grad_weight row is written once (token chunks would re-read all of grad_weight per
        chunk: 1 GiB of traffic each at Llama-3's head); with so many tokens that fewer than
        MIN_BLOCK_COLS columns would fit, MIN_BLOCK_COLS columns by as many rows as fit.
        `chunk_size` given: (chunk_size, vocab), token chunks of whole rows.
        """
        if self.chunk_size is not None:
            return self.chunk_size, vocab
        return vocab_block_shape(tokens, vocab, dtype)


def vocab_block_shape(tokens: int, vocab: int, dtype: torch.dtype = torch.float32,
                      blocks: int = 1) -> tuple[int, int]:
    """(rows, cols) of `blocks` [rows, cols] blocks within the byte budget (`LogitOptions.block_shape`):
    all tokens by as many vocab columns as fit, or MIN_BLOCK_COLS columns by as many rows as fit."""
    budget, itemsize = _budget() // blocks, _itemsize(dtype)
    min_cols = min(vocab, MIN_BLOCK_COLS)
    cols = budget // (max(tokens, 1) * itemsize)
    if cols >= vocab:
        return max(tokens, 1), vocab
    if cols >= min_cols:
        return max(tokens, 1), _aligned(cols)
    return budget_rows(min_cols, dtype, blocks), min_cols


def budget_rows(vocab: int, dtype: torch.dtype = torch.float32, blocks: int = 1) -> int:
    """Rows of `blocks` [rows, vocab] blocks of the accumulation dtype within the byte budget."""
    return _aligned(max(1, _budget() // (blocks * vocab * _itemsize(dtype))))


def _aligned(n: int) -> int:
    return n - n % BLOCK_ALIGN if n >= 2 * BLOCK_ALIGN else n


def _budget() -> int:
    value = os.environ.get("ALIGNFAST_CHUNK_BYTES", "")
    if not value:
        return DEFAULT_CHUNK_BYTES
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"ALIGNFAST_CHUNK_BYTES must be a whole number of bytes, got {value!r}") from None


def _itemsize(dtype: torch.dtype) -> int:
    return max(torch.finfo(dtype).bits // 8, 4)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 inputs (the test oracle)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
