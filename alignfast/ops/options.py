"""The non-tensor options that travel through autograd, as one frozen dataclass."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

DEFAULT_CHUNK_BYTES = 256 * 2**20


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

    def chunk_rows(self, vocab: int, dtype: torch.dtype = torch.float32) -> int:
        """Tokens per chunk: `chunk_size`, or as many [rows, V] fp32 blocks as fit the byte budget.

        The budget is ALIGNFAST_CHUNK_BYTES (default 256 MiB): the chunked paths hold one such block
        (two with entropy), so their memory beyond inputs, outputs and gradients is bounded by it.
        """
        if self.chunk_size is not None:
            return self.chunk_size
        budget = int(os.environ.get("ALIGNFAST_CHUNK_BYTES", DEFAULT_CHUNK_BYTES))
        itemsize = max(torch.finfo(dtype).bits // 8, 4)
        return max(1, budget // (vocab * itemsize))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 inputs (the test oracle)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
