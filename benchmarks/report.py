"""Result rows -> ratios against naive and floor of the same run, CSV, JSON, Markdown, PNG plots."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from pytest_benchmark.stats import Stats

COLUMNS = [
    "suite", "op", "model", "impl", "n", "h", "v", "dtype", "status", "reason",
    "time_median_s", "time_iqr_s", "rounds", "passes", "time_vs_naive", "time_vs_floor", "tflops",
    "extra_peak_bytes", "mem_vs_naive", "peak_bytes", "baseline_bytes", "produced_bytes", "workspace_bytes",
    "mem_method", "timer", "device_type", "device", "cores", "torch_threads", "torch", "cuda", "triton",
    "alignfast", "liger_kernel", "trl", "git_commit", "chunk_bytes_env", "cpp_token_chunks", "timestamp",
]


def timing(times: list[float]) -> dict:
    stats = Stats()
    for t in times:
        stats.update(t)
    return {"time_median_s": stats.median, "time_iqr_s": stats.iqr, "rounds": len(times)}


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def method_flops(op: str, n: int, h: int, v: int) -> int | None:
    """The [N,H]x[H,V] products the method needs (the floor's count: 3 when the gradient is known in the
    forward, 4 with a recompute or a reference model), 2·N·H·V flops each."""
    from benchmarks.ops import OPS

    spec = OPS.get(op)
    return None if spec is None else 2 * spec.floor_matmuls * n * h * v


def add_ratios(rows: list[dict]) -> None:
    """time/naive, time/floor, memory/naive: against the rows of the same op, model, shape and dtype;
    TFLOP/s counting the flops the method needs (so a row's rate over the floor's is 1 / time_vs_floor,
    the share of the matmul rate measured in the same run)."""
    def key(r):
        return r["op"], r.get("model", ""), r["n"], r["h"], r["v"], r["dtype"]
    base = {(key(r), r["impl"]): r for r in rows if r["status"] == "ok"}
    for r in rows:
        naive, floor = base.get((key(r), "naive"), {}), base.get((key(r), "floor"), {})
        ok = r["status"] == "ok"
        r["time_vs_naive"] = _ratio(r.get("time_median_s"), naive.get("time_median_s")) if ok else None
        r["time_vs_floor"] = _ratio(r.get("time_median_s"), floor.get("time_median_s")) if ok else None
        r["mem_vs_naive"] = _ratio(r.get("extra_peak_bytes"), naive.get("extra_peak_bytes")) if ok else None
        flops = method_flops(r["op"], r["n"], r["h"], r["v"]) if ok else None
        rate = _ratio(flops, r.get("time_median_s"))
        r["tflops"] = None if rate is None else rate / 1e12


def write_all(rows: list[dict], out: Path, note: str = "") -> list[Path]:
    """results.csv, results.json, the plots, and summary.md (the table, then the plots it links)."""
    from benchmarks.plots import plot_all

    out.mkdir(parents=True, exist_ok=True)
    rows = [{c: r.get(c) for c in COLUMNS} for r in rows]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    plots = plot_all(rows, out, note=note)
    (out / "summary.md").write_text(markdown(rows, note=note, plots=[p.name for p in plots]))
    return [out / "results.csv", out / "results.json", out / "summary.md", *plots]


def _fmt_time(s):
    return "" if s is None else f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def _fmt_bytes(b):
    if b is None:
        return ""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= scale:
            return f"{b / scale:.4g} {unit}"
    return f"{b} B"


def _fmt_ratio(x):
    return "" if x is None else f"{x:.2f}x"


def markdown(rows: list[dict], note: str = "", plots: list[str] = ()) -> str:
    """The summary table (a model column when the suite's shapes are models'), then the plot files."""
    if not rows:
        return "no results\n"
    m = rows[0]
    passes = max(r.get("passes") or 1 for r in rows)
    models = any(r.get("model") for r in rows)
    lines = [
        f"# alignfast benchmarks: suite `{m['suite']}`", "",
        f"{m['device']} ({m['device_type']}, {m['cores']} cores, {m['torch_threads']} torch threads); "
        f"torch {m['torch']}, triton {m['triton'] or '-'}, alignfast {m['alignfast']}, commit {m['git_commit']}, "
        f"{m['timestamp']}", "",
        "Time: median (IQR) of fwd+bwd rounds"
        + (f", pooled over {passes} interleaved passes (every case once per pass, each in its own process)"
           if passes > 1 else "")
        + ". TFLOP/s: the [N,H]x[H,V] products the method needs (the floor's), over the time."
        + " Extra peak memory: peak beyond inputs, outputs and gradients (see benchmarks/README.md: naive's"
        + " is under-counted by its gradients' size, which are not yet allocated at its peak).",
        "Ratios against `naive` and `floor` of this same run.", "",
        *([f"Shapes: {note}.", ""] if note else []),
    ]
    header = (f"| op |{' model |' if models else ''} N | H | V | dtype | impl | time | IQR | rounds | "
              "time/naive | time/floor | TFLOP/s | extra peak mem | mem/naive |")
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        shape = f"| {r['op']} |" + (f" {r.get('model') or ''} |" if models else "")
        shape += f" {r['n']} | {r['h']} | {r['v']} | {r['dtype']} | {r['impl']} | "
        if r["status"] != "ok":
            lines.append(shape + f"{r['status']}: {(r['reason'] or '').replace('|', '/')[:90]}" + " |" * 8)
            continue
        lines.append(
            shape + f"{_fmt_time(r['time_median_s'])} | {_fmt_time(r['time_iqr_s'])} | {r['rounds']} | "
            f"{_fmt_ratio(r['time_vs_naive'])} | {_fmt_ratio(r['time_vs_floor'])} | "
            f"{'' if r.get('tflops') is None else format(r['tflops'], '.3g')} | "
            f"{_fmt_bytes(r['extra_peak_bytes'])} | {_fmt_ratio(r['mem_vs_naive'])} |")
    if plots:
        lines += ["", "Plots: " + ", ".join(f"[`{name}`]({name})" for name in plots), ""]
        lines += [line for name in plots for line in (f"![{name}]({name})", "")]
    return "\n".join(lines).rstrip("\n") + "\n"
