"""What a case's process does: build the inputs and the step, warm up, measure memory, time.

Timing itself is the caller's: pytest-benchmark on CPU (benchmarks/test_bench.py), CUDA events on
GPU (`cuda_event_times`).
"""
from __future__ import annotations

import json
import os
import traceback
from dataclasses import dataclass

import torch

from benchmarks import impls
from benchmarks.cases import SUITES, Case, find
from benchmarks.memory import measure_round
from benchmarks.ops import OPS

# how the runner tells a case's process what to do (pytest owns the command line)
ENV_SUITE, ENV_CASE, ENV_RESULT = "ALIGNFAST_BENCH_SUITE", "ALIGNFAST_BENCH_CASE", "ALIGNFAST_BENCH_RESULT"
ENV_ROUNDS, ENV_WARMUP = "ALIGNFAST_BENCH_ROUNDS", "ALIGNFAST_BENCH_WARMUP"


@dataclass
class Settings:
    suite: str
    rounds: int
    warmup: int
    result_path: str | None

    @classmethod
    def from_env(cls) -> "Settings":
        suite = os.environ.get(ENV_SUITE, "smoke")
        return cls(suite, int(os.environ.get(ENV_ROUNDS, SUITES[suite].rounds)),
                   int(os.environ.get(ENV_WARMUP, SUITES[suite].warmup)), os.environ.get(ENV_RESULT))


def selected_cases() -> list[Case]:
    """The case named by ALIGNFAST_BENCH_CASE, or every case of the suite (running pytest by hand)."""
    suite = os.environ.get(ENV_SUITE, "smoke")
    case_id = os.environ.get(ENV_CASE)
    return [find(suite, case_id)] if case_id else list(SUITES[suite].cases)


@dataclass
class Prepared:
    step: impls.Step | None
    memory: dict
    skipped: str | None = None


def prepare(case: Case, warmup: int) -> Prepared:
    """Inputs, step, `warmup` rounds (one more for a compiler), then one round that measures memory.

    Memory is never measured on a first call: lazy initialisation (BLAS and thread-pool buffers,
    imports inside other projects' backward) is not the method's memory.
    """
    op, device = OPS[case.op], torch.device(case.device_type)
    reason = impls.unavailable(case.impl, op, device.type)
    if reason:
        return Prepared(None, {}, skipped=reason)
    inputs = op.make_inputs(case.n, case.h, case.v, case.torch_dtype, device)
    try:
        step = impls.build(case.impl, op, inputs)
        for _ in range(max(warmup, 1) + step.compile_warmup):
            step.reset()
            step.run()
        memory = measure_round(step, device)
    except Exception as e:  # noqa: BLE001 -- other projects may fail in many ways; ours may not
        if case.impl not in impls.OPTIONAL:
            raise
        return Prepared(None, {}, skipped=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return Prepared(step, memory)


def cuda_event_times(step: impls.Step, rounds: int) -> list[float]:
    """Seconds per fwd+bwd, CUDA events around each round (gradient reset outside)."""
    times = []
    for _ in range(rounds):
        step.reset()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        step.run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def write_result(path: str | None, case: Case, result: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump({**case.asdict(), **result}, f, indent=1)


def error_result(exc: BaseException) -> dict:
    return {"status": "error", "reason": f"{type(exc).__name__}: {exc}"[:300], "traceback": traceback.format_exc()}
