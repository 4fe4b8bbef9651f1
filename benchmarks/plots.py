"""PNG plots of result rows: time and extra peak memory per impl, one panel per op (and dtype, H, V).

One token count: bars per impl (time with its IQR). Several token counts: one line per impl vs N.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METRICS = {"time": ("time_median_s", "fwd+bwd time (s)"), "memory": ("extra_peak_bytes", "extra peak memory (MiB)")}


def _panels(rows: list[dict]) -> dict:
    panels = defaultdict(list)
    for r in rows:
        if r["status"] == "ok":
            panels[f"{r['op']} H={r['h']} V={r['v']} {r['dtype']}"].append(r)
    return panels


def _draw(ax, rows: list[dict], column: str, scale: float) -> None:
    ns = sorted({r["n"] for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    if len(ns) == 1:
        values = [next(r[column] for r in rows if r["impl"] == i) / scale for i in impls]
        errs = ([next(r["time_iqr_s"] or 0 for r in rows if r["impl"] == i) / 2 for i in impls]
                if column == "time_median_s" else None)
        ax.bar(impls, values, yerr=errs, color=[f"C{k}" for k in range(len(impls))])
        ax.set_xlabel(f"N={ns[0]}")
        ax.tick_params(axis="x", labelrotation=30)
    else:
        for k, impl in enumerate(impls):
            pts = sorted((r["n"], r[column] / scale) for r in rows if r["impl"] == impl)
            ax.plot(*zip(*pts), marker="o", color=f"C{k}", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens N")
        ax.legend(fontsize="small")


def plot_all(rows: list[dict], out: Path) -> list[Path]:
    panels = _panels(rows)
    if not panels:
        return []
    paths = []
    for name, (column, label) in METRICS.items():
        scale = 2**20 if column == "extra_peak_bytes" else 1.0
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
        for ax, (title, prs) in zip(axes[0], panels.items()):
            _draw(ax, prs, column, scale)
            ax.set_title(title, fontsize="medium")
            ax.set_ylabel(label)
            ax.grid(axis="y", alpha=0.3)
        fig.suptitle(f"{rows[0]['suite']}: {rows[0]['device']}", fontsize="small")
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
