"""The `cpp` backend with vocab-major vs row-major token chunks, paired (a diagnostic; time only).

The `cpp` backend forms a token chunk's logits (a block spanning the whole vocabulary) either as
h·Wᵀ or as the [V, rows] product W·hᵀ read transposed, by CPU vendor or ALIGNFAST_CPU_LAYOUT
(`alignfast.ops.cpu_layout`), because the BLAS runs one or the other faster depending on the CPU
(`python -m benchmarks.chunk_gemms` times the products alone). This times fwd+bwd of one op with
`cpp` in each layout, next to the floor, taking turns in one process (as `benchmarks.paired`).

    python -m benchmarks.layouts --op linear_cross_entropy --rounds 3
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time
from unittest import mock

import torch

from alignfast.ops.cpu_layout import cpu_vendor
from benchmarks import impls
from benchmarks.cases import DTYPES
from benchmarks.ops import OPS
from benchmarks.paired import table


def cpu_layout(layout: str):
    """`cpp` with its token chunks in `layout` ("row" or "vocab") inside the returned context."""
    return mock.patch.dict(os.environ, {"ALIGNFAST_CPU_LAYOUT": layout})


def paired(op_name: str, n: int, h: int, v: int, rounds: int) -> str:
    op = OPS[op_name]
    inputs = op.make_inputs(n, h, v, DTYPES["fp32"], torch.device("cpu"))
    steps = {"floor": impls.build("floor", op, inputs), "cpp": impls.build("cpp", op, inputs)}
    variants = {"floor": ("floor", contextlib.nullcontext),
                "cpp vocab-major": ("cpp", lambda: cpu_layout("vocab")),
                "cpp row-major": ("cpp", lambda: cpu_layout("row"))}

    def run(name: str) -> float:
        step, context = variants[name]
        with context():
            steps[step].reset()
            t0 = time.perf_counter()
            steps[step].run()
            return time.perf_counter() - t0

    for name in variants:
        run(name)   # warm-up
    times = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % 3:] + names[:r % 3]:
            times[name].append(run(name))
    return (f"{op_name}, N={n} H={h} V={v} fp32, {torch.get_num_threads()} threads, "
            f"{cpu_vendor() or 'unknown'} CPU: fwd+bwd, "
            f"{rounds} paired rounds in one process (order rotating)\n\n" + table(times, "floor"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--op", default="linear_cross_entropy", choices=sorted(OPS))
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--h", type=int, default=1024)
    p.add_argument("--v", type=int, default=128256)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    print(paired(args.op, args.n, args.h, args.v, args.rounds))


if __name__ == "__main__":
    main()
