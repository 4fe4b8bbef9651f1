"""Metrics to the console, a JSONL file (always) and TensorBoard / W&B when asked for."""
from __future__ import annotations

import json
import os


class MetricsLogger:
    """Writes `{"step", "split", ...metrics}` rows; only the main process should own one.

    On resume, rows after the resumed step are dropped from metrics.jsonl, and a row logged again for
    the resumed step itself (the final eval of a finished run resumed) replaces the kept one, so an
    interrupted and resumed run leaves the same file as an uninterrupted one.
    """

    def __init__(self, cfg, run_name: str, *, resume_step: int | None = None, console=print):
        os.makedirs(cfg.output_dir, exist_ok=True)
        self.path = os.path.join(cfg.output_dir, "metrics.jsonl")
        self.console = console
        self.resume_step, self._splits_at_resume = resume_step, set()
        if resume_step is None:
            open(self.path, "w").close()
        else:
            self._truncate_after(resume_step)
        self.tb = self.wandb = None
        if "tensorboard" in cfg.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(cfg.output_dir, "tensorboard"))
        if "wandb" in cfg.report_to:
            import wandb

            self.wandb = wandb.init(name=run_name, config=cfg.to_dict(), resume="allow")

    def _truncate_after(self, step: int) -> None:
        """Keeps the rows up to `step`. A row cut short by the crash (the file is appended, not synced
        like the checkpoints) is dropped with the other rows after the checkpoint."""
        if not os.path.exists(self.path):
            return
        rows = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line) if line.strip() else None
                except json.JSONDecodeError:
                    break  # the torn last line: nothing after it was written
                if row is not None and row.get("step", 0) <= step:
                    rows.append(line if line.endswith("\n") else line + "\n")
                    if row.get("step") == step:
                        self._splits_at_resume.add(row.get("split"))
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(rows)

    def _drop_row(self, step: int, split: str) -> None:
        with open(self.path, encoding="utf-8") as f:
            lines = f.readlines()
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(line for line in lines if _key(json.loads(line)) != (step, split))

    def last_row(self, split: str) -> dict:
        """The metrics of the file's last `split` row (without step and split), or {}."""
        row = {}
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    candidate = json.loads(line)
                    if candidate.get("split") == split:
                        row = candidate
        return {k: v for k, v in row.items() if k not in ("step", "split")}

    def log(self, step: int, split: str, metrics: dict, *, echo: bool = True) -> None:
        row = {"step": step, "split": split, **{k: _plain(v) for k, v in metrics.items()}}
        if step == self.resume_step and split in self._splits_at_resume:
            self._splits_at_resume.discard(split)
            self._drop_row(step, split)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if echo:
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k not in ("step", "split"))
            self.console(f"[{split} step {step}] {shown}")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{split}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{split}/{k}": v for k, v in row.items() if k != "step"}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _plain(v):
    return v.item() if hasattr(v, "item") else v


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _key(row: dict) -> tuple:
    return row.get("step"), row.get("split")
