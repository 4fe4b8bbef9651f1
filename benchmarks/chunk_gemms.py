"""How much a vendor GEMM loses when the token dimension is cut into chunks (a diagnostic).

The fused forward+backward (`linear_cross_entropy`, the fused losses) needs each row's lse before
its gradient, so it works on token chunks of whole rows: at the default 256 MiB budget and
V=128256, 523 rows. Each of its three products is then a chunk-sized BLAS call:

    logits  = h[c] @ W.T     (M=rows, K=H, N=V)   reads the whole head W
    grad_h  = dz @ W         (M=rows, K=V, N=H)   reads the whole head W
    grad_W += dz.T @ h[c]    (M=V, K=rows, N=H)   reads and writes the whole grad_W

This times each product over all N tokens at once and in chunks of the given sizes, round-robin in
one process (so drift hits every variant alike), and prints medians and ratios as a Markdown table.

    python -m benchmarks.chunk_gemms --rounds 3 --chunks 523 1046 > benchmarks/results/<dir>/chunk_gemms.md
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def _products(n: int, h: int, v: int):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) / h**0.5
    dz = torch.randn(n, v, generator=g) / v
    grad_h, grad_w = torch.empty(n, h), torch.empty(v, h)

    def logits(rows):
        buf = torch.empty(min(rows, n), v)
        for s in range(0, n, rows):
            x = hidden[s:s + rows]
            torch.mm(x, weight.t(), out=buf[: x.shape[0]])

    def hidden_grad(rows):
        for s in range(0, n, rows):
            torch.mm(dz[s:s + rows], weight, out=grad_h[s:s + rows])

    def weight_grad(rows):
        for s in range(0, n, rows):
            if s == 0:
                torch.mm(dz[:rows].t(), hidden[:rows], out=grad_w)
            else:
                grad_w.addmm_(dz[s:s + rows].t(), hidden[s:s + rows])

    return {"logits = h @ W.T": logits, "grad_h = dz @ W": hidden_grad, "grad_W += dz.T @ h": weight_grad}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--chunks", type=int, nargs="+", default=[523, 1046])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    n = args.tokens
    sizes = [n] + [c for c in args.chunks if c < n]
    products = _products(n, args.hidden, args.vocab)
    times = {(name, rows): [] for name in products for rows in sizes}
    for name, f in products.items():
        f(n)  # warm up (page faults of the buffers)
    for _ in range(args.rounds):
        for name, f in products.items():
            for rows in sizes:
                t0 = time.perf_counter()
                f(rows)
                times[name, rows].append(time.perf_counter() - t0)

    print(f"N={n} H={args.hidden} V={args.vocab} fp32, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} round-robin rounds (s; × the unchunked product)\n")
    print("| product | " + " | ".join("all rows" if r == n else f"chunks of {r}" for r in sizes) + " |")
    print("|---" * (len(sizes) + 1) + "|")
    for name in products:
        base = statistics.median(times[name, n])
        cells = [f"{statistics.median(times[name, r]):.2f} ({statistics.median(times[name, r]) / base:.2f}×)"
                 for r in sizes]
        print(f"| `{name}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
