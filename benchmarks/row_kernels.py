"""What the row-wise work between the BLAS calls costs, native vs PyTorch (a diagnostic).

Each block of logits that a pass makes gets one row-kernel call: `stats` (logsumexp, target,
optionally entropy) reads it, `grad_` overwrites it with dL/dz. This times both for the `cpp`
backend's kernels (`alignfast.ops.native_rows`) and the `chunked` backend's PyTorch ones
(`alignfast.ops.rowwise`) on one block, next to a bare `mul_` over the same bytes (the memory
floor of a read-modify-write pass), round-robin in one process. Default block: the backward's
[4096, 16384] fp32 slice at the 256 MiB budget.

    python -m benchmarks.row_kernels --rounds 5 > benchmarks/results/<dir>/row_kernels.md
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from alignfast.ops import native_rows, rowwise
from alignfast.ops.options import LogitOptions


def _kernels(z0: torch.Tensor, targets: torch.Tensor, opts: LogitOptions):
    """{name: fn(z)} over a working copy z of the block (refreshed before each call)."""
    st = rowwise.stats(z0.clone(), targets, opts)
    g = torch.Generator().manual_seed(1)
    g_lp = torch.randn(z0.shape[0], generator=g)
    g_ent = torch.randn(z0.shape[0], generator=g) if opts.with_entropy else None
    grad_args = (st.lse, st.entropy, g_lp, g_ent, None, None, opts)
    kernels = {"bare mul_ (memory floor)": lambda z: z.mul_(2.0)}
    sets = [("torch", rowwise)] + ([("native", native_rows)] if native_rows.available() else [])
    for name, rows in sets:
        kernels[f"{name} stats"] = lambda z, rows=rows: rows.stats(z, targets, opts)
        kernels[f"{name} grad_"] = lambda z, rows=rows: rows.grad_(z, targets, *grad_args)
    return kernels


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=16384)
    p.add_argument("--entropy", action="store_true", help="with the entropy and its gradient")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(args.rows, args.cols, generator=g) * 3
    targets = torch.randint(0, args.cols, (args.rows,), generator=g)
    opts = LogitOptions(with_entropy=args.entropy)
    kernels = _kernels(z0, targets, opts)
    z = z0.clone()
    times = {name: [] for name in kernels}
    for _ in range(args.rounds + 1):   # the first round warms up
        for name, f in kernels.items():
            z.copy_(z0)
            t0 = time.perf_counter()
            f(z)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["bare mul_ (memory floor)"][1:])
    print(f"[{args.rows}, {args.cols}] fp32 block{' with entropy' if args.entropy else ''}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} round-robin rounds\n")
    print("| kernel | ms | × bare mul_ | ns per element |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts[1:])
        print(f"| {name} | {med * 1e3:.1f} | {med / base:.2f}× | {med * 1e9 / z0.numel():.2f} |")


if __name__ == "__main__":
    main()
