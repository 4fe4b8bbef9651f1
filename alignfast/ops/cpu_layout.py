"""Which layout the `cpp` backend forms its token chunks in on a CPU: row-major or vocab-major.

A token chunk (a [rows, V] logits block spanning the whole vocabulary) can be the product h·Wᵀ or
the [V, rows] product W·hᵀ read transposed (`chunked.logits_block`); the row kernels and every later
product read either. Which is faster is the BLAS's business, and it differs by CPU
(`python -m benchmarks.chunk_gemms`, H=1024, V=128256, the pass's three products on token chunks
over their all-rows time):

    MKL on an Intel Xeon (AVX-512), 523 rows:  row-major 1.095×, vocab-major 1.050×
    MKL on an AMD EPYC (Zen 4), 523 rows:      row-major 1.030×, vocab-major 1.19× (W·hᵀ alone 1.55×)
    MKL on an AMD EPYC (Zen 4), 512 rows:      row-major 1.024×, vocab-major 1.032×

Budget-sized chunks are 512 rows (`options.BLOCK_ALIGN`), but the fused losses pack whole
sequences, so their chunks can have any number of rows, 523 among them.
So `auto` takes vocab-major on Intel CPUs and row-major elsewhere; ALIGNFAST_CPU_LAYOUT=row|vocab
overrides it. The choice is fixed per machine, so a run's rounding does not depend on a timing.
"""
from __future__ import annotations

import functools
import os

LAYOUTS = ("auto", "row", "vocab")


def token_chunks_vocab_major() -> bool:
    """Whether the `cpp` backend forms token chunks vocab-major (ALIGNFAST_CPU_LAYOUT, default auto)."""
    layout = os.environ.get("ALIGNFAST_CPU_LAYOUT", "auto").strip().lower() or "auto"
    if layout not in LAYOUTS:
        raise ValueError(f"ALIGNFAST_CPU_LAYOUT must be one of {LAYOUTS}, got "
                         f"{os.environ['ALIGNFAST_CPU_LAYOUT']!r}")
    if layout == "auto":
        return cpu_vendor() == "GenuineIntel"
    return layout == "vocab"


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor string (GenuineIntel, AuthenticAMD, ...), or "" where Linux's cpuinfo is absent."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
