"""The registry of cases: op x shape x dtype x impl, grouped in suites."""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import torch

from benchmarks.ops import OPS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclass(frozen=True)
class Case:
    op: str
    impl: str
    n: int
    h: int
    v: int
    dtype: str
    device_type: str   # "cpu" or "cuda"

    @property
    def id(self) -> str:
        return f"{self.op}-{self.impl}-N{self.n}-H{self.h}-V{self.v}-{self.dtype}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def asdict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Suite:
    name: str
    cases: tuple
    rounds: int           # timed rounds (median and IQR over them)
    warmup: int           # untimed rounds first; then one that measures memory, then the timed ones
    timeout_s: int        # per case process


def grid(ops, impls, shapes, dtypes, device) -> tuple:
    """Shapes outermost, so a run cut short by a time budget has every op at the first shapes."""
    return tuple(Case(op, impl, n, h, v, dt, device)
                 for (n, h, v), dt, op, impl in itertools.product(shapes, dtypes, ops, impls))


CPU_IMPLS = ("naive", "floor", "chunked", "cpp", "torch_compile", "liger", "trl")
GPU_IMPLS = ("naive", "floor", "chunked", "triton", "cuda", "liger", "cce", "trl", "torch_compile")

SUITES = {
    "smoke": Suite("smoke", grid(OPS, CPU_IMPLS, [(256, 64, 4096)], ["fp32"], "cpu"),
                   rounds=5, warmup=1, timeout_s=300),
    # the target shape; one naive fwd+bwd takes ~35 s on 2 cores, a case runs warmup+1+rounds
    "cpu": Suite("cpu", grid(OPS, CPU_IMPLS, [(4096, 1024, 128256)], ["fp32"], "cpu"),
                 rounds=3, warmup=1, timeout_s=1800),
    # model-shaped (Llama-3 8B head), a few token counts
    "gpu": Suite("gpu", grid(OPS, GPU_IMPLS, [(n, 4096, 128256) for n in (4096, 8192, 16384)], ["bf16"], "cuda"),
                 rounds=20, warmup=3, timeout_s=600),
}


def find(suite: str, case_id: str) -> Case:
    for case in SUITES[suite].cases:
        if case.id == case_id:
            return case
    raise KeyError(f"no case {case_id!r} in suite {suite!r}")
