"""Resume after SIGKILL, refusal of foreign or corrupted checkpoints, NaN skipping."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from alignfast.data import toy, write_jsonl
from alignfast.trainers import CheckpointError, TrainingStopped
from alignfast.trainers.sft import SFTTrainer
from trainer_helpers import make_trainer

RUN = ["max_steps=10", "save_steps=3", "learning_rate=3e-3", "save_total_limit=10"]

DRIVER = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    from alignfast.trainers import SFTConfig, load_config
    from alignfast.trainers.sft import SFTTrainer

    class Slow(SFTTrainer):  # slow enough for the test to kill it between checkpoints
        def training_step(self, micro):
            time.sleep(0.3)
            return super().training_step(micro)

    model, data, out = sys.argv[1:4]
    cfg = load_config(SFTConfig, None, sys.argv[4:], model=model, dataset=data, output_dir=out)
    Slow(cfg).train()
""")


def _train_rows(out_dir):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, open(os.path.join(out_dir, "metrics.jsonl")))
            if r["split"] == "train"]


def test_sigkill_then_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    data = write_jsonl(toy.sft_records(48), tmp_path / "sft.jsonl")
    args = RUN + ["per_device_batch_size=8", "disable_tqdm=true", "logging_steps=1", "max_length=32"]
    # uninterrupted, in this process
    ref_out = tmp_path / "ref"
    from alignfast.trainers import SFTConfig, load_config

    SFTTrainer(load_config(SFTConfig, None, args, model=tiny_model_dir, dataset=data,
                           output_dir=str(ref_out))).train()
    # killed after its first checkpoint
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, tiny_model_dir, data, str(out), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "checkpoint-000003").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "model.safetensors").exists()  # it did not finish
    resumed = SFTTrainer(load_config(SFTConfig, None, args + ["resume_from=latest"], model=tiny_model_dir,
                                     dataset=data, output_dir=str(out)))
    resumed.train()
    assert resumed.step == 10
    a, b = load_file(ref_out / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert _train_rows(out) == _train_rows(ref_out)


def test_foreign_and_corrupted_checkpoints_are_refused(tiny_model_dir, tmp_path):
    tr = make_trainer("sft", tiny_model_dir, tmp_path, ["max_steps=2", "save_steps=1"])
    tr.train()
    ckpt = tmp_path / "checkpoint-000001"
    other = make_trainer("sft", tiny_model_dir, tmp_path / "o", ["max_steps=2", "learning_rate=1e-2",
                                                                  f"resume_from={ckpt}"])
    with pytest.raises(CheckpointError, match="another run"):
        other.train()
    with open(ckpt / "optimizer.pt", "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage\x00")
    same = make_trainer("sft", tiny_model_dir, tmp_path / "s", ["max_steps=2", f"resume_from={ckpt}"])
    with pytest.raises(CheckpointError, match="corrupted: optimizer.pt"):
        same.train()
    os.remove(ckpt / "manifest.json")
    with pytest.raises(CheckpointError, match="incomplete"):
        same.train()


class Poisoned(SFTTrainer):
    """A loss that is NaN on the steps listed in `nan_steps`."""

    nan_steps = ()

    def compute_loss(self, model, batch):
        loss, metrics = super().compute_loss(model, batch)
        if self.step + 1 in self.nan_steps:
            loss = loss * float("nan")
        return loss, metrics


def test_nan_steps_are_skipped_then_training_stops(tiny_model_dir, tmp_path):
    from alignfast.trainers import SFTConfig, load_config
    from trainer_helpers import FAST

    def run(out, nan_steps, extra=()):
        cfg = load_config(SFTConfig, None, FAST + ["max_steps=8", "save_steps=2", "max_bad_steps=3", *extra],
                          model=tiny_model_dir, output_dir=str(out))
        tr = type("P", (Poisoned,), {"nan_steps": nan_steps})(cfg, train_dataset=toy.sft_records(64))
        return tr

    tr = run(tmp_path / "a", {3})
    before = [p.detach().clone() for p in tr.model.parameters()]
    tr.train()
    assert tr.skipped_steps == 1 and tr.step == 8
    rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert [r["step"] for r in rows if r.get("skipped")] == [3]
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))

    tr = run(tmp_path / "b", {5, 6, 7, 8})
    with pytest.raises(TrainingStopped, match="3 non-finite losses in a row.*checkpoint-000004"):
        tr.train()
    assert sorted(os.listdir(tmp_path / "b")) == ["checkpoint-000002", "checkpoint-000004", "metrics.jsonl"]


def test_a_metrics_row_torn_by_the_crash_does_not_block_resume(tmp_path):
    """metrics.jsonl is appended (not synced like the checkpoints): a kill mid-write leaves half a row."""
    from types import SimpleNamespace

    from alignfast.trainers.metrics import MetricsLogger

    cfg = SimpleNamespace(output_dir=str(tmp_path), report_to=["jsonl"])
    logger = MetricsLogger(cfg, "run", console=lambda *_: None)
    for step in (1, 2, 3):
        logger.log(step, "train", {"loss": 1.0 / step})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "split": "train", "lo')
    MetricsLogger(cfg, "run", resume_step=2, console=lambda *_: None).log(3, "train", {"loss": 0.5})
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.5)]
