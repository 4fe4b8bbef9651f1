"""The demo's report: demo.md (the before/after table, the models' answers, the settings) and PNG plots
of each stage's training curves, read from its metrics.jsonl (matplotlib, Agg backend: no display).
"""
from __future__ import annotations

import json
import os
import platform

import torch

# (stage directory, title, panels): each panel is (y label, metric keys of metrics.jsonl drawn on it);
# the first panel is the stage's headline curve (the one the overview shows).
CURVES = (
    ("sft", "SFT", [("cross-entropy", ["loss"])]),
    ("reward", "Reward model", [("train accuracy", ["accuracy"]), ("Bradley-Terry loss", ["loss"])]),
    ("dpo", "DPO", [("train implicit accuracy", ["rewards/accuracies"]), ("DPO loss", ["loss"])]),
    ("kto", "KTO", [("implicit reward", ["rewards/chosen", "rewards/rejected"]), ("KTO loss", ["loss"])]),
    ("ppo", "PPO", [("score (RM + task reward)", ["objective/scores"]), ("KL to SFT", ["objective/kl"])]),
    ("grpo", "GRPO", [("mean task reward", ["reward"]), ("completion length", ["completion_length"])]),
    ("cai/sl", "CAI: SL (SFT on revisions)", [("cross-entropy", ["loss"])]),
    ("cai/rl", "CAI: RL (DPO on AI labels)", [("train implicit accuracy", ["rewards/accuracies"]),
                                              ("DPO loss", ["loss"])]),
)
OVERVIEW = "training_curves.png"


def read_metrics(path: str, split: str = "train") -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [row for row in map(json.loads, filter(str.strip, f)) if row.get("split") == split]


def plot_file(stage_dir: str) -> str:
    return f"curves_{stage_dir.replace('/', '_')}.png"


def write_plots(output_dir: str) -> list[str]:
    """One PNG per stage (its curves side by side) and an overview of all stages; returns the file names
    (none without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written, panels = [], []
    for stage_dir, title, series in CURVES:
        rows = read_metrics(os.path.join(output_dir, stage_dir, "metrics.jsonl"))
        found = [(label, keys) for label, keys in series if any(k in r for k in keys for r in rows)]
        if not found:
            continue
        panels.append((title, rows, found))
        fig, axes = plt.subplots(1, len(found), figsize=(4.2 * len(found), 3.2), squeeze=False)
        for ax, (label, keys) in zip(axes[0], found):
            _plot(ax, rows, keys, label)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(os.path.join(output_dir, plot_file(stage_dir)), dpi=100)
        plt.close(fig)
        written.append(plot_file(stage_dir))
    if panels:
        cols = 4
        nrows = -(-len(panels) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
        for ax, (title, rows, found) in zip(axes.flat, panels):
            label, keys = found[0]  # the stage's headline curve
            _plot(ax, rows, keys, label)
            ax.set_title(title, fontsize=10)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(os.path.join(output_dir, OVERVIEW), dpi=100)
        plt.close(fig)
        written.insert(0, OVERVIEW)
    return written


def smooth(values: list[float], window: int) -> list[float]:
    """Centred moving average over `window` points (fewer at the ends)."""
    half = window // 2
    return [sum(values[max(0, i - half):i + half + 1]) / len(values[max(0, i - half):i + half + 1])
            for i in range(len(values))]


def _plot(ax, rows, keys, label) -> None:
    """Each key's values against the step: the raw points faint, a moving average over them."""
    for color, key in zip(("C0", "C1", "C2"), keys):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        steps, values = [s for s, _ in points], [v for _, v in points]
        ax.plot(steps, values, color=color, alpha=0.3, linewidth=0.8)
        ax.plot(steps, smooth(values, max(1, len(values) // 12)), color=color, linewidth=1.6, label=key)
    if len(keys) > 1:
        ax.legend(fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)


def _fmt(x: float) -> str:
    return f"{x:.2f}" if abs(x) < 100 else f"{x:.0f}"


def markdown(result, plots: list[str]) -> str:
    lines = ["# alignfast demo: post-training a tiny Llama on a verifiable task", "",
             "Task: reverse a 3-6 letter word (`reverse hbdf:` -> `It is fdbh.`). The SFT demonstrations give "
             "the right answer but mostly curtly (`fdbh!!`); the preference data, the reward and the "
             "constitution prefer the right answer in a full sentence without exclamation marks. "
             f"Held-out: {result.held_out} words never trained on. "
             f"Model: {result.model} and a char-level tokenizer, built from code; seed {result.seed}"
             + (", shortened run (`--quick`)." if result.quick else "."), "",
             "| stage | held-out metric | before | after | change |", "| --- | --- | ---: | ---: | ---: |"]
    for r in result.rows:
        lines.append(f"| {r.stage} | {r.metric} | {_fmt(r.before)} | {_fmt(r.after)} | {r.change:+.2f} |")
    lines += ["", "How each number is measured (held-out prompts and pairs only; \"before\" is the model the stage "
              "starts from):", "",
              "- SFT: greedy answers that give the right reversal, in either form; before: the random init.",
              "- RM (the SFT model with a score head, trained on preference pairs): held-out pairs where "
              "r(chosen) > r(rejected); the score head starts at zero, so every pair ties before (ties count half: "
              "0.50).",
              "- DPO, KTO: held-out pairs where the implicit reward β·log π(y|x)/π_ref(y|x), π_ref = the SFT "
              "model, ranks the chosen completion above the rejected one (KTO trains on unpaired good/bad examples); "
              "before: the SFT model against itself, all ties, 0.50.",
              "- PPO (rewards: the RM's score + the task reward), GRPO (the task reward): two samples per prompt at "
              "temperature 1; task reward 1 for the right reversal in a full sentence, 0.5 for it in another form, "
              "0 otherwise; KL = the mean over the samples of Σ_t log π(y_t) − log π_SFT(y_t).",
              "- CAI (SL: two critique/revision rounds by a rule-based feedback model of a three-principle "
              "constitution — full sentence, no exclamation marks, correct reversal — then SFT on the revisions; "
              "RL: DPO on pairs the same judge labels): prompts where the judge prefers the CAI model's greedy "
              "answer to the SFT model's, averaged over the principles, each judged in both orders; ties count "
              "half, so the SFT model against itself is 0.50.", ""]
    if result.policies:
        lines += ["## Greedy answers on held-out prompts", "",
                  "| model | correct | full sentence | " + " | ".join(f"`{p}`" for p in result.examples) + " |",
                  "| --- | ---: | ---: | " + " | ".join("---" for _ in result.examples) + " |"]
        for name, m in result.policies.items():
            shown = " | ".join(f"`{t}`" if t else "(empty)" for t in m["responses"][:len(result.examples)])
            lines.append(f"| {name} | {m['accuracy']:.2f} | {m['well_formed']:.2f} | {shown} |")
        lines.append("")
    lines += ["## Training curves", ""]
    if plots:
        lines += [f"![training curves]({plots[0]})", "", "Each stage's curves, in the demo's output directory: "
                  + ", ".join(f"`{p}`" for p in plots[1:]) + "."]
    else:
        lines.append("(no plots: matplotlib is not installed)")
    lines.append("")
    lines += ["## Settings", "", f"Data: {result.train} training words, one record each per data kind (SFT "
              "demonstrations, preference pairs, unpaired examples, prompts with their answers); CAI samples its own "
              "responses to a subset of the prompts. Every stage after SFT starts from the SFT model.", "",
              "| stage | options | wall time (s) |", "| --- | --- | ---: |"]
    for stage, options in result.settings.items():
        shown = ", ".join(f"{k}={v}" for k, v in options.items()
                          if k not in ("cpu", "save_total_limit", "logging_steps", "constitution"))
        lines.append(f"| {stage} | {shown} | {result.seconds.get(stage, 0):.0f} |")
    total = sum(result.seconds.values())
    lines += ["", f"Total wall time: {total:.0f} s (torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
              f"{platform.machine()} CPU).", ""]
    return "\n".join(lines)


def write_report(result) -> str:
    """Writes demo.md and the plots into result.output_dir; returns demo.md's path."""
    plots = write_plots(result.output_dir)
    path = os.path.join(result.output_dir, "demo.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(markdown(result, plots))
    return path
