"""How much a vendor GEMM loses when the token dimension is cut into chunks (a diagnostic).

The fused forward+backward (`linear_cross_entropy`, the fused losses) needs each row's lse before
its gradient, so it works on token chunks of whole rows: at the default 256 MiB budget and
V=128256, 512 rows (523 fit; blocks are whole multiples of 16 rows, since an odd leading
dimension can cost a BLAS dearly, as `--chunks 523` shows). Each of its three products is then a
chunk-sized BLAS call:

    logits  = h[c] @ W.T     (M=rows, K=H, N=V)   reads the whole head W
    grad_h  = dz @ W         (M=rows, K=V, N=H)   reads the whole head W
    grad_W += dz.T @ h[c]    (M=V, K=rows, N=H)   reads and writes the whole grad_W

This times each product over all N tokens at once and in chunks of the given sizes, round-robin in
one process (so drift hits every variant alike), and prints medians and ratios as a Markdown table.
Chunks come in both layouts of the block: row-major ([rows, V], h @ W.T) and vocab-major (the
[V, rows] product W @ h.T, read transposed), which the `cpp` backend's token chunks use on a CPU.

    python -m benchmarks.chunk_gemms --rounds 3 --chunks 512 523 > benchmarks/results/<dir>/chunk_gemms.md
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def _products(n: int, h: int, v: int):
    """{product: fn(rows, vocab_major)} over chunks of `rows` tokens, each block in the given layout."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) / h**0.5
    dz = torch.randn(n, v, generator=g) / v
    grad_h, grad_w = torch.empty(n, h), torch.empty(v, h)
    dz_vocab_major = {}   # rows -> a [V, rows] block (its values do not matter to the timing)

    def blocks(rows, vocab_major):
        for s in range(0, n, rows):
            r = min(rows, n - s)
            if not vocab_major:
                yield s, r, dz[s:s + r]
                continue
            if r not in dz_vocab_major:
                dz_vocab_major[r] = dz[:r].t().contiguous()
            yield s, r, dz_vocab_major[r].t()

    buf = torch.empty(n * v)   # one buffer, reused as the driver's is (no page faults in the timing)

    def logits(rows, vocab_major):
        for s in range(0, n, rows):
            x = hidden[s:s + rows]
            if vocab_major:
                torch.mm(weight, x.t(), out=buf[: x.shape[0] * v].view(v, x.shape[0]))
            else:
                torch.mm(x, weight.t(), out=buf[: x.shape[0] * v].view(x.shape[0], v))

    def hidden_grad(rows, vocab_major):
        for s, r, block in blocks(rows, vocab_major):
            torch.mm(block, weight, out=grad_h[s:s + r])

    def weight_grad(rows, vocab_major):
        for s, r, block in blocks(rows, vocab_major):
            if s == 0:
                torch.mm(block.t(), hidden[:r], out=grad_w)
            else:
                grad_w.addmm_(block.t(), hidden[s:s + r])

    return {"logits = h @ W.T": logits, "grad_h = dz @ W": hidden_grad, "grad_W += dz.T @ h": weight_grad}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--chunks", type=int, nargs="+", default=[512, 523])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    n = args.tokens
    # (rows, vocab-major): all rows at once, then each chunk size in both layouts
    variants = [(n, False)] + [(c, vm) for c in args.chunks if c < n for vm in (False, True)]
    products = _products(n, args.hidden, args.vocab)
    times = {(name, variant): [] for name in products for variant in variants}
    for name, f in products.items():
        f(n, False)  # warm up (page faults of the buffers)
    for _ in range(args.rounds):
        for name, f in products.items():
            for variant in variants:
                t0 = time.perf_counter()
                f(*variant)
                times[name, variant].append(time.perf_counter() - t0)

    def label(rows, vocab_major):
        return "all rows" if rows == n else f"chunks of {rows}" + (", vocab-major" if vocab_major else "")

    print(f"N={n} H={args.hidden} V={args.vocab} fp32, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} round-robin rounds (s; × the unchunked product)\n")
    print("| product | " + " | ".join(label(*variant) for variant in variants) + " |")
    print("|---" * (len(variants) + 1) + "|")
    for name in products:
        medians = [statistics.median(times[name, var]) for var in variants]
        cells = [f"{m:.2f} ({m / medians[0]:.2f}×)" for m in medians]
        print(f"| `{name}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
