"""Paired timing: several impls of one op round-robin in one CPU process (time only, no memory).

The suites run each case in its own process, which peak memory needs; but this machine's speed
drifts by 10-20% between processes, more than a 5% target. Here the impls share one process and
one set of inputs and take turns, round after round (the order rotating), so drift hits them
alike and the time ratios are paired. Same `Step`s as the suites (`benchmarks.impls.build`).

    python -m benchmarks.paired --op linear_cross_entropy --impl floor --impl cpp --rounds 5
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks import impls
from benchmarks.cases import DTYPES
from benchmarks.ops import OPS


def run(op_name: str, impl_names: list[str], n: int, h: int, v: int, dtype: str, rounds: int,
        warmup: int = 1) -> dict[str, list[float]]:
    """{impl: [seconds per round]} of fwd+bwd, the impls taking turns in a rotating order."""
    op, device = OPS[op_name], torch.device("cpu")
    inputs = op.make_inputs(n, h, v, DTYPES[dtype], device)
    steps = {}
    for name in impl_names:
        reason = impls.unavailable(name, op, device.type)
        if reason:
            raise SystemExit(f"{name}: {reason}")
        steps[name] = impls.build(name, op, inputs)
    for step in steps.values():
        for _ in range(max(warmup, 1) + step.compile_warmup):
            step.reset()
            step.run()
    times = {name: [] for name in steps}
    for r in range(rounds):
        order = impl_names[r % len(impl_names):] + impl_names[:r % len(impl_names)]
        for name in order:
            steps[name].reset()
            t0 = time.perf_counter()
            steps[name].run()
            times[name].append(time.perf_counter() - t0)
    return times


def table(times: dict[str, list[float]], base: str) -> str:
    ref = statistics.median(times[base])
    lines = [f"| impl | median | min-max | × {base} |", "|---|---|---|---|"]
    for name, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"| {name} | {med:.2f} s | {min(ts):.2f}-{max(ts):.2f} s | {med / ref:.3f}x |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--op", default="linear_cross_entropy", choices=sorted(OPS))
    p.add_argument("--impl", action="append", help="repeatable; the first is the ratios' base (default: floor, cpp)")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--h", type=int, default=1024)
    p.add_argument("--v", type=int, default=128256)
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    names = args.impl or ["floor", "cpp"]
    times = run(args.op, names, args.n, args.h, args.v, args.dtype, args.rounds)
    print(f"{args.op}, N={args.n} H={args.h} V={args.v} {args.dtype}, {torch.get_num_threads()} threads: "
          f"fwd+bwd, {args.rounds} paired rounds in one process (order rotating)\n")
    print(table(times, names[0]))


if __name__ == "__main__":
    main()
