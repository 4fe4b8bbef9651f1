"""One benchmark case per test: `python -m benchmarks.run` starts each in its own pytest process.

By hand: ALIGNFAST_BENCH_SUITE=smoke pytest benchmarks/test_bench.py (every case of the suite in
one process, so the memory figures are not clean; the runner's are).
"""
from __future__ import annotations

import pytest

from benchmarks import measure

CASES = measure.selected_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case, benchmark):
    settings = measure.Settings.from_env()
    benchmark.group = f"{case.op}-N{case.n}-H{case.h}-V{case.v}-{case.dtype}"
    try:
        prepared = measure.prepare(case, settings.warmup)
    except Exception as e:
        measure.write_result(settings.result_path, case, measure.error_result(e))
        raise
    if prepared.skipped:
        measure.write_result(settings.result_path, case, {"status": "skipped", "reason": prepared.skipped})
        pytest.skip(prepared.skipped)

    step = prepared.step
    if case.device_type == "cuda":
        times, timer = measure.cuda_event_times(step, settings.rounds), "cuda_events"
    else:
        benchmark.pedantic(step.run, setup=step.reset, rounds=settings.rounds, warmup_rounds=0, iterations=1)
        times, timer = list(benchmark.stats.stats.data), "pytest-benchmark"
    benchmark.extra_info.update(prepared.memory)
    measure.write_result(settings.result_path, case,
                         {"status": "ok", "reason": "", "timer": timer, "times_s": times, **prepared.memory})
