"""PNG plots of result rows: fwd+bwd time and extra peak memory, one colour per impl in every plot.

- `time.png`, `memory.png`: shapes measured at one token count: bars per impl, one panel per op and
  shape (time with its IQR).
- `time_vs_tokens.png`, `memory_vs_tokens.png`: shapes measured at several token counts: one line
  per impl vs N, one panel per op (rows) and model or shape (columns).

Time on a log axis (a constant ratio is a constant gap), memory on a linear axis from 0.
- `time_vs_vocab.png`, `memory_vs_vocab.png`: several vocabularies at one token count: one line per
  impl vs V (ticks name the model: its H differs too), one panel per op (rows) and N (columns).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

METRICS = {"time": ("time_median_s", "fwd+bwd time (s)", 1.0),
           "memory": ("extra_peak_bytes", "extra peak memory (MiB)", 2**20)}


def _shape(r: dict) -> str:
    return f"{r.get('model') or ''} H={r['h']} V={r['v']} {r['dtype']}".strip()


def _groups(rows: list[dict], key) -> dict:
    groups = defaultdict(list)
    for r in rows:
        groups[key(r)].append(r)
    return groups


def plot_all(rows: list[dict], out: Path, note: str = "") -> list[Path]:
    """Every plot the rows support (see the module docstring); returns the paths written."""
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return []
    colours = {impl: f"C{k}" for k, impl in enumerate(dict.fromkeys(r["impl"] for r in rows))}
    title = f"{rows[0]['suite']}: {rows[0]['device']}, {rows[0]['torch_threads']} torch threads" + (
        f"\n{note}" if note else "")
    by_shape = _groups(ok, lambda r: (r["op"], _shape(r)))
    single = {k: g for k, g in by_shape.items() if len({r["n"] for r in g}) == 1}
    several = {k: g for k, g in by_shape.items() if len({r["n"] for r in g}) > 1}
    by_tokens = _groups(ok, lambda r: (r["op"], r["n"], r["dtype"]))
    vocab = {(op, f"N={n} {dt}"): g for (op, n, dt), g in by_tokens.items() if len({r["v"] for r in g}) > 1}

    paths = []
    kinds = (("", single, _bars), ("_vs_tokens", several, _vs_tokens), ("_vs_vocab", vocab, _vs_vocab))
    for suffix, panels, draw in kinds:
        for name, (column, label, scale) in METRICS.items():
            if panels:
                path = out / f"{name}{suffix}.png"
                paths.append(_figure(path, panels, draw, column, label, scale, colours, title))
    return paths


def _figure(path: Path, panels: dict, draw, column: str, label: str, scale: float, colours: dict,
            title: str) -> Path:
    """One panel per (op, column) key: ops down, models/shapes or token counts across (one row of
    ops when there is one column)."""
    ops = list(dict.fromkeys(op for op, _ in panels))
    cols = list(dict.fromkeys(c for _, c in panels))
    grid = [[(op, c) for c in cols] for op in ops] if len(cols) > 1 else [[(op, cols[0]) for op in ops]]
    legend = draw is not _bars   # bars name their impl on the x axis
    fig, axes = plt.subplots(len(grid), len(grid[0]), squeeze=False,
                             figsize=(4.6 * len(grid[0]) + 1.2 * legend, 3.6 * len(grid) + 0.8))
    for ax, key in zip(axes.flat, (k for row in grid for k in row)):
        if key not in panels:
            ax.set_visible(False)
            continue
        draw(ax, panels[key], column, scale, colours)
        ax.set_title(f"{key[0]}\n{key[1]}", fontsize="medium")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    right = 1.0
    if legend:
        shown = list(dict.fromkeys(r["impl"] for g in panels.values() for r in g))
        handles = [plt.Line2D([], [], color=colours[i], marker="o", linewidth=2) for i in shown]
        fig.legend(handles, shown, loc="center right", title="impl", fontsize="small")
        right -= 1.0 / fig.get_figwidth()
    fig.suptitle(title, fontsize="small")
    fig.tight_layout(rect=(0, 0, right, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bars(ax, rows: list[dict], column: str, scale: float, colours: dict) -> None:
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    values = [next(r[column] for r in rows if r["impl"] == i) / scale for i in impls]
    errs = ([next(r["time_iqr_s"] or 0 for r in rows if r["impl"] == i) / 2 for i in impls]
            if column == "time_median_s" else None)
    ax.bar(impls, values, yerr=errs, color=[colours[i] for i in impls])
    ax.set_xlabel(f"N={rows[0]['n']}")
    ax.tick_params(axis="x", labelrotation=30)
    ax.grid(axis="x", visible=False)


def _lines(ax, rows: list[dict], x: str, column: str, scale: float, colours: dict) -> list:
    for impl in dict.fromkeys(r["impl"] for r in rows):
        pts = sorted((r[x], r[column] / scale, (r["time_iqr_s"] or 0) / 2) for r in rows if r["impl"] == impl)
        xs, ys, errs = zip(*pts)
        ax.errorbar(xs, ys, yerr=errs if column == "time_median_s" else None, marker="o", color=colours[impl],
                    capsize=2, label=impl)
    if column == "time_median_s":   # log: a constant ratio between impls is a constant gap
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:                           # linear from 0: memory that stays flat as N or V grows shows as flat
        ax.set_ylim(bottom=min(0, ax.get_ylim()[0]))
    return sorted({r[x] for r in rows})


def _vs_tokens(ax, rows: list[dict], column: str, scale: float, colours: dict) -> None:
    ns = _lines(ax, rows, "n", column, scale, colours)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("tokens N")


def _vs_vocab(ax, rows: list[dict], column: str, scale: float, colours: dict) -> None:
    vs = _lines(ax, rows, "v", column, scale, colours)
    names = {r["v"]: r.get("model") or f"H={r['h']}" for r in rows}
    ax.set_xscale("log", base=2)
    ax.set_xticks(vs, [f"{v}\n{names[v]}" for v in vs], fontsize="x-small")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("vocabulary V")
