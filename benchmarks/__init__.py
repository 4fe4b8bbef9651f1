"""alignfast benchmark suite: a registry of cases (op x shape x dtype x implementation), each
timed (pytest-benchmark on CPU, CUDA events on GPU) and memory-profiled in its own process.

    python -m benchmarks.run --suite smoke|cpu|gpu [--rounds R] [--out DIR] [--dry-run]

See benchmarks/README.md for what every column means.
"""
