"""Run a benchmark suite, each case in its own process, and write the report.

    python -m benchmarks.run --suite cpu               # the issue's target shape (slow: ~15 min on 2 cores)
    python -m benchmarks.run --suite cpu-models        # 3 models' heads scaled by 1/8, N=256-1024 (~15 min)
    python -m benchmarks.run --quick                   # = --suite smoke: tiny shapes, every impl, < ~1 min
    python -m benchmarks.run --suite gpu --dry-run     # list the cases and what would be skipped
    python -m benchmarks.run --suite cpu --rounds 5 --only linear_logprobs --impl naive --impl chunked
    python -m benchmarks.run --suite cpu --passes 3 --rounds 1 --only linear_cross_entropy  # interleaved

Writes results.csv, results.json, summary.md and the PNG plots (benchmarks.plots) to --out (default
benchmarks/results/<suite>/), the pytest-benchmark JSON and log of each case under raw/.
`alignfast bench ARGS` runs this with ARGS from a source checkout.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import impls, machine, measure, report
from benchmarks.cases import SUITES, Case
from benchmarks.ops import OPS

HERE = Path(__file__).resolve().parent
# in a case's process, allocations >= 1 MiB are mmap'ed and go back to the OS when freed, so the
# resident set follows the live tensors (glibc's adaptive threshold would keep some freed blocks
# resident and hide them from the next round's peak); tensors at benchmark shapes are far larger anyway
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}
# a case's pytest loads only pytest-benchmark: other installed plugins (hypothesis, anyio) cost ~2 s a process
PYTEST_ENV = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--suite", choices=sorted(SUITES), default="cpu")
    p.add_argument("--quick", action="store_true", help="same as --suite smoke")
    p.add_argument("--rounds", type=int, help="timed rounds per case (default: the suite's)")
    p.add_argument("--warmup", type=int, help="untimed rounds per case, >= 1 (default: the suite's)")
    p.add_argument("--only", action="append", default=[], help="keep cases whose id contains this (repeatable)")
    p.add_argument("--impl", action="append", default=[], help="keep only this impl (repeatable)")
    p.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/<suite>)")
    p.add_argument("--passes", type=int, default=1,
                   help="run every case this many times, one pass over all cases after another, and pool "
                        "their timings: slow drift of the machine then hits every impl alike (default 1)")
    p.add_argument("--timeout", type=int, help="seconds per case process (default: the suite's)")
    p.add_argument("--budget", type=float, help="seconds for the whole run: later cases are skipped")
    p.add_argument("--dry-run", action="store_true", help="list the cases and exit")
    args = p.parse_args(argv)
    if args.quick:
        args.suite = "smoke"
    return args


def static_skip(case: Case) -> str | None:
    return impls.unavailable(case.impl, OPS[case.op], case.device_type)


def suite_env(suite) -> dict:
    """The suite's case-process environment; a variable already set in the environment wins."""
    return {k: os.environ.get(k, v) for k, v in suite.env.items()}


def run_case(case: Case, args, suite, raw: Path, tag: str = "", timeout: float | None = None) -> dict:
    """Start `pytest benchmarks/test_bench.py` for this case alone; return its result dict, with the
    round times in `times_s`. `tag` tells the raw files of a case's passes apart."""
    name = case.id + tag
    result_path, log_path = raw / f"{name}.result.json", raw / f"{name}.log"
    result_path.unlink(missing_ok=True)
    env = {**os.environ, **suite_env(suite), measure.ENV_SUITE: suite.name, measure.ENV_CASE: case.id,
           measure.ENV_RESULT: str(result_path),
           measure.ENV_ROUNDS: str(args.rounds or suite.rounds),
           measure.ENV_WARMUP: str(args.warmup or suite.warmup), **PYTEST_ENV}
    if case.device_type == "cpu":
        env.update(MALLOC_ENV)
    cmd = [sys.executable, "-m", "pytest", str(HERE / "test_bench.py"), "-q", "-p", "no:cacheprovider",
           "-p", "pytest_benchmark.plugin", "-o", "addopts=",
           f"--benchmark-json={raw / (name + '.benchmark.json')}"]
    try:
        with open(log_path, "w") as log:
            subprocess.run(cmd, cwd=machine.ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                           timeout=timeout or args.timeout or suite.timeout_s, check=False)
    except subprocess.TimeoutExpired:
        limit = timeout or args.timeout or suite.timeout_s
        if limit < (args.timeout or suite.timeout_s):  # the budget cut it short: not the case's failure
            return {"status": "skipped", "reason": f"time budget of {args.budget:.0f} s spent while it ran ({limit:.0f} s)"}
        return {"status": "error", "reason": f"timed out after {limit:.0f} s"}
    if not result_path.exists():
        tail = log_path.read_text().strip().splitlines()[-1:] or ["no output"]
        return {"status": "error", "reason": f"case process wrote no result ({tail[0][:200]}); see {log_path}"}
    result = json.loads(result_path.read_text())
    result.pop("traceback", None)
    return result


def pool_passes(results: list[dict]) -> dict:
    """One row from a case's passes: the first failure or skip if any; else the timings of every pass
    pooled (median, IQR over all rounds) and the memory figures of the pass with the highest peak."""
    for r in results:
        if r.get("status") != "ok":
            return r
    row = dict(max(results, key=lambda r: r.get("extra_peak_bytes", 0)))
    row.update(report.timing([t for r in results for t in r.pop("times_s", [])]))
    row.pop("times_s", None)
    row["passes"] = len(results)
    return row


def _progress(i: int, total: int, case: Case, row: dict, seconds: float) -> str:
    if row["status"] != "ok":
        what = f"{row['status']}: {row['reason']}"
    else:
        times = sorted(row["times_s"])
        what = (f"{times[len(times) // 2] * 1e3:.4g} ms median of {len(times)}, "
                f"extra peak {row['extra_peak_bytes'] / 2**20:.4g} MiB")
    return f"[{i}/{total}] {case.id}: {what} ({seconds:.0f} s)"


def main(argv=None) -> int:
    args = parse_args(argv)
    suite = SUITES[args.suite]
    cases = [c for c in suite.cases if (not args.only or any(s in c.id for s in args.only))
             and (not args.impl or c.impl in args.impl)]
    env = suite_env(suite)
    note = "; ".join(filter(None, [suite.note, " ".join(f"{k}={v}" for k, v in env.items())]))
    if args.dry_run:
        print(f"suite {suite.name}: {len(cases)} cases, {args.rounds or suite.rounds} rounds, "
              f"{args.warmup or suite.warmup} warmup" + (f"\n{note}" if note else ""))
        for c in cases:
            reason = static_skip(c)
            print(f"  {c.id}" + (f"  (skipped: {reason})" if reason else ""))
        return 0

    out = args.out or HERE / "results" / suite.name
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    info = {"suite": suite.name, "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
            **machine.describe(cases[0].device_type if cases else "cpu")}
    info["chunk_bytes_env"] = env.get("ALIGNFAST_CHUNK_BYTES", info["chunk_bytes_env"])
    print(f"suite {suite.name}: {len(cases)} cases on {info['device']} ({info['cores']} cores), "
          f"torch {info['torch']}, commit {info['git_commit']}", flush=True)
    began = time.perf_counter()
    results: dict[str, list[dict]] = {c.id: [] for c in cases}
    for p in range(args.passes):
        for i, case in enumerate(cases, 1):
            start = time.perf_counter()
            done = results[case.id]
            if done and done[-1].get("status") != "ok":
                continue   # a case that failed or was skipped once is not run again
            reason = static_skip(case)
            if not reason and args.budget is not None and start - began > args.budget:
                if done:
                    continue   # measured in an earlier pass: keep those rounds
                reason = f"time budget of {args.budget:.0f} s spent"
            tag = f".pass{p + 1}" if args.passes > 1 else ""
            timeout = args.timeout or suite.timeout_s
            if args.budget is not None:  # a case started late ends with the budget, so the report is written
                timeout = min(timeout, max(args.budget - (start - began), 10.0))
            done.append({"status": "skipped", "reason": reason} if reason else
                        run_case(case, args, suite, raw, tag, timeout))
            label = f"pass {p + 1}/{args.passes} " if args.passes > 1 else ""
            print(label + _progress(i, len(cases), case, done[-1], time.perf_counter() - start), flush=True)
    rows = [{**info, **case.asdict(), **pool_passes(results[case.id])} for case in cases]
    report.add_ratios(rows)
    paths = report.write_all(rows, out, note=note)
    print()
    print(report.markdown(rows, note=note))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 1 if any(r["status"] == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
