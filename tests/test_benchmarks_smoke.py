"""The benchmark runner end to end on the smoke suite's tiny shape: files, rows, columns, ratios,
and the one memory claim that must hold there (chunked needs less extra memory than naive)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IMPLS = ("naive", "floor", "chunked", "cpp", "liger")   # the fast ones; torch_compile and trl take ~1 min more
OPS = ("linear_logprobs", "linear_cross_entropy", "linear_kl", "linear_kl_mean", "cross_entropy_filtered", "dpo",
       "kto", "ppo", "ppo_full_kl", "grpo", "simpo", "orpo", "cpo")
COLUMNS = {"suite", "op", "impl", "n", "h", "v", "dtype", "status", "reason", "time_median_s", "time_iqr_s",
           "rounds", "time_vs_naive", "time_vs_floor", "extra_peak_bytes", "mem_vs_naive", "peak_bytes",
           "device", "cores", "torch", "triton", "alignfast", "git_commit"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    # 256 KiB blocks: chunked holds [16, 4096] fp32 at a time, naive the whole [256, 4096] logits (4 MiB)
    env = {**os.environ, "ALIGNFAST_CHUNK_BYTES": str(256 * 2**10)}
    cmd = [sys.executable, "-m", "benchmarks.run", "--quick", "--rounds", "2", "--out", str(out),
           *(a for impl in IMPLS for a in ("--impl", impl))]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _rows(out: Path) -> dict:
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert COLUMNS <= set(rows[0]), COLUMNS - set(rows[0])
    return {(r["op"], r["impl"]): r for r in rows}


@pytest.mark.slow
def test_outputs_exist(smoke):
    for name in ("results.csv", "results.json", "summary.md", "time.png", "memory.png"):
        assert (smoke / name).stat().st_size > 0, name
    for name in ("time.png", "memory.png"):
        assert (smoke / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _rows(smoke)
    assert set(rows) == {(op, impl) for op in OPS for impl in IMPLS}
    assert len(json.loads((smoke / "results.json").read_text())) == len(rows)
    summary = (smoke / "summary.md").read_text()
    assert "time/naive" in summary and "mem/naive" in summary
    assert sum(line.startswith(tuple(f"| {op} |" for op in OPS)) for line in summary.splitlines()) == len(rows)


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_rows_and_ratios(smoke, op):
    rows = _rows(smoke)
    for impl in ("naive", "floor", "chunked"):
        r = rows[op, impl]
        assert r["status"] == "ok", r["reason"]
        assert (int(r["n"]), int(r["h"]), int(r["v"]), r["dtype"]) == (256, 64, 4096, "fp32")
        assert float(r["time_median_s"]) > 0 and int(r["rounds"]) == 2
    assert float(rows[op, "naive"]["time_vs_naive"]) == 1.0
    assert float(rows[op, "floor"]["time_vs_floor"]) == 1.0
    assert rows[op, "cpp"]["status"] in ("ok", "skipped")
    # every impl has its row; one that cannot run here says why (Liger's CE is Triton; Liger has no PPO)
    assert all(r["status"] == "ok" or r["reason"] for r in rows.values())


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_chunked_needs_less_memory_than_naive(smoke, op):
    rows = _rows(smoke)
    chunked, naive = int(rows[op, "chunked"]["extra_peak_bytes"]), int(rows[op, "naive"]["extra_peak_bytes"])
    assert chunked < naive, (chunked, naive)
    assert naive >= 4 * 2**20   # at least the [256, 4096] fp32 logits


@pytest.mark.slow
def test_interleaved_passes_end_to_end(tmp_path):
    """--passes 2: each case runs once per pass, in its own process, and its row pools both."""
    cmd = [sys.executable, "-m", "benchmarks.run", "--quick", "--passes", "2", "--rounds", "1",
           "--only", "linear_logprobs", "--impl", "naive", "--impl", "chunked", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["impl"], r["rounds"], r["passes"]) for r in rows] == [("naive", 2, 2), ("chunked", 2, 2)]
    assert sorted(p.name for p in (tmp_path / "raw").glob("*.result.json")) == sorted(
        f"linear_logprobs-{impl}-N256-H64-V4096-fp32.pass{k}.result.json" for impl in ("naive", "chunked")
        for k in (1, 2))
    assert "pooled over 2 interleaved passes" in (tmp_path / "summary.md").read_text()


def test_chunk_gemms_table(capsys):
    """The chunked-GEMM diagnostic on a tiny shape: one row per product, a column per chunk size and
    layout, the unchunked column at 1.00x."""
    from benchmarks import chunk_gemms

    chunk_gemms.main(["--tokens", "64", "--hidden", "8", "--vocab", "100", "--chunks", "16", "100", "--rounds", "1"])
    lines = capsys.readouterr().out.splitlines()
    # 100 >= N: not a chunk size
    assert lines[2] == "| product | all rows | chunks of 16 | chunks of 16, vocab-major |"
    rows = [line for line in lines if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == ["logits = h @ W.T", "grad_h = dz @ W", "grad_W += dz.T @ h"]
    assert all("(1.00×)" in r.split("|")[2] for r in rows)


def test_paired_rounds():
    """The paired runner on a tiny shape: every impl timed once per round, ratios against the first."""
    from benchmarks import paired

    times = paired.run("linear_cross_entropy", ["floor", "chunked"], 64, 16, 256, "fp32", rounds=3)
    assert set(times) == {"floor", "chunked"} and all(len(t) == 3 and min(t) > 0 for t in times.values())
    lines = paired.table(times, "floor").splitlines()
    assert lines[2].startswith("| floor |") and lines[2].endswith("| 1.000x |") and lines[3].startswith("| chunked |")


def test_layouts_paired():
    """The layout diagnostic on a tiny shape: floor and cpp with each token-chunk layout, paired; inside
    each context the cpp driver's token-chunk blocks have that layout, after it the machine's own."""
    import torch

    from alignfast.ops import cpu_layout, native_rows
    from alignfast.ops.logprobs import implementation
    from benchmarks import layouts

    if not native_rows.available():
        pytest.skip("alignfast._C is not built")
    h, w = torch.randn(5, 8), torch.randn(30, 8)
    default = implementation("cpp")._logits(h, w, None, None).stride()
    with layouts.cpu_layout("row"):
        assert implementation("cpp")._logits(h, w, None, None).stride() == (30, 1)
    with layouts.cpu_layout("vocab"):
        assert implementation("cpp")._logits(h, w, None, None).stride() == (1, 5)
    assert default == ((1, 5) if cpu_layout.token_chunks_vocab_major() else (30, 1))
    assert implementation("cpp")._logits(h, w, None, None).stride() == default
    lines = layouts.paired("linear_cross_entropy", 64, 16, 256, rounds=2).splitlines()
    assert [line.split("|")[1].strip() for line in lines[4:]] == ["floor", "cpp vocab-major", "cpp row-major"]
    assert lines[4].endswith("| 1.000x |")


def test_row_kernels_table(capsys):
    """The row-kernel diagnostic on a tiny block: the memory floor at 1.00x and a stats and a grad_ row
    per kernel set (PyTorch always, native when alignfast._C is built)."""
    from alignfast.ops import native_rows
    from benchmarks import row_kernels

    row_kernels.main(["--rows", "8", "--cols", "300", "--rounds", "1", "--entropy"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "ms" not in line]
    names = [r.split("|")[1].strip() for r in rows]
    sets = ["torch"] + (["native"] if native_rows.available() else [])
    assert names == ["bare mul_ (memory floor)"] + [f"{s} {k}" for s in sets for k in ("stats", "grad_")]
    assert rows[0].split("|")[3].strip() == "1.00×"


def test_a_case_cut_short_by_the_budget_is_skipped_not_failed(tmp_path):
    """A case started late runs until the budget ends; cut there, it is 'skipped' and the run's status 0
    (it was an error: gpu_check.sh then failed on every run whose budget ended mid-case)."""
    cmd = [sys.executable, "-m", "benchmarks.run", "--quick", "--impl", "naive", "--only", "linear_logprobs",
           "--rounds", "100000", "--budget", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _rows(tmp_path)
    assert [r["status"] for r in rows.values()] == ["skipped"], rows
    assert "time budget of 1 s spent while it ran" in next(iter(rows.values()))["reason"]
