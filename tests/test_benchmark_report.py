"""The benchmark registry's model-shaped suite and the report of model-shaped rows: the table's model
column, the plots vs tokens and vs vocab (and the bars of a one-shape suite), the summary's links,
and how a case's interleaved passes are pooled into one row.
No case process runs here (the runner end to end: tests/test_benchmarks_smoke.py)."""
from __future__ import annotations

import pytest

from benchmarks import report
from benchmarks.cases import CPU_MODEL_SCALE, CPU_MODEL_TOKENS, MODELS, SUITES

PNG = b"\x89PNG\r\n\x1a\n"


def test_cpu_models_suite_is_the_models_heads_scaled():
    suite = SUITES["cpu-models"]
    ids = [c.id for c in suite.cases]
    assert len(ids) == len(set(ids))
    for case in suite.cases:
        h, v = MODELS[case.model]
        assert (case.h * CPU_MODEL_SCALE, case.v * CPU_MODEL_SCALE) == (h, v), case.id
        assert case.model in case.id and case.device_type == "cpu"
    shapes = {(c.op, c.model, c.n) for c in suite.cases if c.impl == "naive"}
    assert shapes == {(op, m, n) for op in ("linear_logprobs", "linear_cross_entropy") for m in MODELS
                      for n in CPU_MODEL_TOKENS}
    assert {c.n for c in suite.cases if c.impl == "liger"} == {CPU_MODEL_TOKENS[0]}   # recorded once
    assert "ALIGNFAST_CHUNK_BYTES" in suite.env


def _row(op, impl, n, h, v, model="", seconds=1.0, extra=2**20):
    return {"suite": "t", "op": op, "model": model, "impl": impl, "n": n, "h": h, "v": v, "dtype": "fp32",
            "status": "ok", "reason": "", "time_median_s": seconds, "time_iqr_s": seconds / 10, "rounds": 3,
            "extra_peak_bytes": extra, "device": "cpu", "device_type": "cpu", "cores": 2, "torch_threads": 1,
            "torch": "x", "triton": "", "alignfast": "x", "git_commit": "x", "timestamp": "x"}


def test_model_rows_plot_vs_tokens_and_vocab(tmp_path):
    rows = [_row(op, impl, n, h // 64, v // 64, model=m, seconds=n * v * (2 if impl == "naive" else 1) / 1e9,
                 extra=n * v * (4 if impl == "naive" else 1))
            for op in ("linear_logprobs", "linear_cross_entropy") for m, (h, v) in MODELS.items()
            for n in (64, 128, 256) for impl in ("naive", "chunked")]
    rows.append({**_row("linear_cross_entropy", "liger", 64, 64, 2004, model="Llama-3-8B"),
                 "status": "skipped", "reason": "RuntimeError: no GPU"})
    report.add_ratios(rows)
    paths = report.write_all(rows, tmp_path, note="heads / 64")
    names = [p.name for p in paths]
    plots = ["time_vs_tokens.png", "memory_vs_tokens.png", "time_vs_vocab.png", "memory_vs_vocab.png"]
    assert names == ["results.csv", "results.json", "summary.md", *plots]
    for name in plots:
        assert (tmp_path / name).read_bytes()[:8] == PNG, name
    summary = (tmp_path / "summary.md").read_text()
    assert "| op | model | N |" in summary and "| linear_logprobs | Gemma-2-2B | 256 | 36 | 4000 |" in summary
    assert "heads / 64" in summary and all(f"]({name})" in summary for name in plots)
    naive = next(r for r in rows if r["impl"] == "naive" and r["n"] == 64)
    assert naive["time_vs_naive"] == 1.0


@pytest.mark.parametrize("ns", [(4096,), (1024, 2048)])
def test_one_shape_rows_plot_bars(tmp_path, ns):
    rows = [_row(op, impl, n, 64, 4096) for op in ("linear_logprobs", "dpo") for n in ns
            for impl in ("naive", "floor", "chunked")]
    names = [p.name for p in report.write_all(rows, tmp_path)]
    want = ["time.png", "memory.png"] if len(ns) == 1 else ["time_vs_tokens.png", "memory_vs_tokens.png"]
    assert names[3:] == want
    assert "| op | N | H | V |" in (tmp_path / "summary.md").read_text()   # no model column


def test_passes_pool_their_rounds():
    from benchmarks.run import pool_passes

    first = {"status": "ok", "times_s": [3.0, 1.0], "extra_peak_bytes": 10, "peak_bytes": 20}
    second = {"status": "ok", "times_s": [2.0, 9.0], "extra_peak_bytes": 30, "peak_bytes": 40}
    row = pool_passes([first, second])
    assert (row["rounds"], row["passes"]) == (4, 2)
    assert row["time_median_s"] == 2.5                   # the median of all four rounds
    assert row["extra_peak_bytes"] == 30 and row["peak_bytes"] == 40   # the pass with the higher peak
    assert "times_s" not in row
    skipped = {"status": "skipped", "reason": "no such backend"}
    assert pool_passes([skipped]) == skipped



def test_tflops_count_the_products_the_method_needs():
    """6·N·H·V when the gradient is known in the forward, 8·N·H·V with a recompute or a reference: a
    row's rate over the floor's is 1 / time_vs_floor, the share of the same run's matmul rate."""
    rows = [_row("linear_cross_entropy", "floor", 1000, 100, 10000, seconds=0.5),
            _row("linear_cross_entropy", "cpp", 1000, 100, 10000, seconds=0.8),
            _row("linear_logprobs", "cpp", 1000, 100, 10000, seconds=2.0),
            {**_row("dpo", "cce", 1000, 100, 10000), "status": "skipped", "reason": "no GPU"}]
    report.add_ratios(rows)
    assert rows[0]["tflops"] == pytest.approx(6e9 / 0.5 / 1e12) and rows[1]["tflops"] == pytest.approx(6e9 / 0.8 / 1e12)
    assert rows[2]["tflops"] == pytest.approx(8e9 / 2.0 / 1e12) and rows[3]["tflops"] is None
    assert rows[1]["tflops"] / rows[0]["tflops"] == pytest.approx(1 / rows[1]["time_vs_floor"])
    assert "| TFLOP/s |" in report.markdown(rows)
