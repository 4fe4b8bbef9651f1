"""The `cpp` backend with vocab-major vs row-major token chunks, paired (a diagnostic; time only).

The `cpp` backend forms a token chunk's logits (a block spanning the whole vocabulary) as the
[V, rows] product W·hᵀ and reads it transposed (`ChunkedLogProbs._logits`), because on a CPU MKL
runs that product, and grad_weight's from the gradient block in that layout, faster than h·Wᵀ
(`python -m benchmarks.chunk_gemms` times the products alone). This times fwd+bwd of one op with
`cpp` as it is and with row-major token chunks, next to the floor, taking turns in one process (as
`benchmarks.paired`).

    python -m benchmarks.layouts --op linear_cross_entropy --rounds 3
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch

from alignfast.ops import chunked
from benchmarks import impls
from benchmarks.cases import DTYPES
from benchmarks.ops import OPS
from benchmarks.paired import table


@contextlib.contextmanager
def row_major_token_chunks():
    """`cpp` with every logits block row-major (the layout before vocab-major token chunks)."""
    original = chunked.ChunkedLogProbs._logits

    def row_major(self, hidden, weight, bias, out, *, whole_vocab=True):
        return chunked.logits_block(hidden, weight, bias, out=out, vocab_major=False)

    chunked.ChunkedLogProbs._logits = row_major
    try:
        yield
    finally:
        chunked.ChunkedLogProbs._logits = original


def paired(op_name: str, n: int, h: int, v: int, rounds: int) -> str:
    op = OPS[op_name]
    inputs = op.make_inputs(n, h, v, DTYPES["fp32"], torch.device("cpu"))
    steps = {"floor": impls.build("floor", op, inputs), "cpp": impls.build("cpp", op, inputs)}
    variants = {"floor": ("floor", contextlib.nullcontext),
                "cpp vocab-major": ("cpp", contextlib.nullcontext),
                "cpp row-major": ("cpp", row_major_token_chunks)}

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
    return (f"{op_name}, N={n} H={h} V={v} fp32, {torch.get_num_threads()} threads: fwd+bwd, "
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
