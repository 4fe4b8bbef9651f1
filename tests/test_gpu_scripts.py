"""The GPU machine's scripts, checked here where no GPU is: they parse, and the gpu suite they run puts
the issue's target shape and the baselines it is judged against first (the run is cut by a budget)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_wheels.sh"])
def test_script_is_valid_bash(script):
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], check=True)


def test_gpu_suite_starts_with_the_target_shape():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite", "gpu", "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=True)
    cases = [line.split()[0] for line in proc.stdout.splitlines()[1:] if line.startswith("  ")]
    assert len(cases) == 4 * 9 * 3, cases
    first = [c.rsplit("-N", 1)[0] for c in cases[:6]]
    assert first == ["linear_cross_entropy-" + impl for impl in ("naive", "floor", "triton", "cuda", "liger", "cce")]
    assert all("-N16384-" in c for c in cases[:36]), cases[:36]
