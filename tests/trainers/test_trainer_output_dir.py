"""What a run does with the checkpoints it finds: a new run never silently mixes with an earlier
one's, a finished run resumed adds nothing, edited data is noticed, a torn newest checkpoint falls
back to the one before."""
import json
import logging
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from alignfast.data import toy, write_jsonl
from alignfast.trainers import CheckpointError, SFTConfig, load_config
from alignfast.trainers.sft import SFTTrainer
from trainer_helpers import FAST, make_trainer


def _rows(out_dir):
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def _checkpoints(out_dir):
    return sorted(p for p in os.listdir(out_dir) if p.startswith("checkpoint-"))


def test_a_new_run_refuses_an_output_dir_with_checkpoints(tiny_model_dir, tmp_path):
    """Before: it pruned the earlier run's checkpoints as its own (or kept them and its own were pruned),
    and a later --resume picked whichever was newest."""
    make_trainer("sft", tiny_model_dir, tmp_path, ["max_steps=4", "save_steps=2"]).train()
    assert _checkpoints(tmp_path) == ["checkpoint-000002", "checkpoint-000004"]
    again = make_trainer("sft", tiny_model_dir, tmp_path, ["max_steps=2", "learning_rate=1e-2"])
    with pytest.raises(CheckpointError, match="holds checkpoints of an earlier run.*--resume.*overwrite_output_dir"):
        again.train()
    assert _checkpoints(tmp_path) == ["checkpoint-000002", "checkpoint-000004"]  # untouched
    make_trainer("sft", tiny_model_dir, tmp_path, ["max_steps=2", "learning_rate=1e-2",
                                                   "overwrite_output_dir=true"]).train()
    assert _checkpoints(tmp_path) == ["checkpoint-000002"]
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2]


def test_resuming_a_finished_run_adds_nothing(tiny_model_dir, tmp_path):
    """Its final eval was logged again (the row duplicated) when the last checkpoint came after it."""
    common = ["max_steps=3", "eval_fraction=0.25"]
    finished = make_trainer("sft", tiny_model_dir, tmp_path, common).train()
    before, weights = _rows(tmp_path), load_file(tmp_path / "model.safetensors")
    assert [(r["step"], r["split"]) for r in before] == [(1, "train"), (2, "train"), (3, "train"), (3, "eval")]
    again = make_trainer("sft", tiny_model_dir, tmp_path, common + ["resume_from=latest"]).train()
    assert _rows(tmp_path) == before
    assert again.keys() == finished.keys() and again["loss"] == finished["loss"]  # not only eval_*
    after = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(weights[k], after[k]) for k in weights)


def test_resume_refuses_edited_training_data(tiny_model_dir, tmp_path):
    """The config hash names the dataset by its path; the data's fingerprint catches an edit under it."""
    records = toy.sft_records(32)
    data = write_jsonl(records, tmp_path / "sft.jsonl")
    args = FAST + ["max_steps=4", "save_steps=2"]

    def trainer(*extra):
        return SFTTrainer(load_config(SFTConfig, None, args + list(extra), model=tiny_model_dir, dataset=data,
                                      output_dir=str(tmp_path / "out")))

    trainer().train()
    trainer("resume_from=latest").train()  # unchanged data: resumes
    records[5] = {**records[5], "completion": records[5]["completion"] + "0"}
    write_jsonl(records, tmp_path / "sft.jsonl")
    with pytest.raises(CheckpointError, match="trained on other data"):
        trainer("resume_from=latest").train()


def test_a_torn_newest_checkpoint_falls_back_to_the_one_before(tiny_model_dir, tmp_path, caplog):
    common = ["max_steps=3", "save_steps=1", "save_total_limit=5", "learning_rate=3e-3"]
    make_trainer("sft", tiny_model_dir, tmp_path, common).train()
    finished = load_file(tmp_path / "model.safetensors")
    os.remove(tmp_path / "checkpoint-000003" / "optimizer.pt")  # as a crash mid-rewrite would leave it
    resumed = make_trainer("sft", tiny_model_dir, tmp_path, common + ["resume_from=latest"])
    with caplog.at_level(logging.WARNING):
        resumed.train()
    assert "checkpoint-000003" in caplog.text and "resuming from the one before" in caplog.text
    again = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(finished[k], again[k]) for k in finished)  # step 3 redone exactly
    # every checkpoint torn: the error says so
    for name in _checkpoints(tmp_path):
        os.remove(tmp_path / name / "optimizer.pt")
    with pytest.raises(CheckpointError, match="corrupted"):
        make_trainer("sft", tiny_model_dir, tmp_path, common + ["resume_from=latest"]).train()


def test_rewriting_a_checkpoint_leaves_no_aside_copy(tiny_model_dir, tmp_path):
    tr = make_trainer("sft", tiny_model_dir, tmp_path, ["max_steps=1"])
    tr.train()
    tr.save_checkpoint()  # the same step again: the old copy is set aside, then removed
    assert _checkpoints(tmp_path) == ["checkpoint-000001"]
    assert not [p for p in os.listdir(tmp_path) if p.endswith((".old", ".tmp"))]


def test_a_moved_folder_of_runs_still_resumes(tiny_model_dir, tmp_path, monkeypatch):
    """A run whose model lies beside its output_dir (cai's stages: model=<dir>/sl, output_dir=<dir>/rl)
    hashed the model's absolute path, so moving or renaming the folder holding both made --resume refuse
    its own checkpoints as another run's."""
    shutil.copytree(tiny_model_dir, tmp_path / "before" / "sl")
    common = ["max_steps=2", "save_steps=1", "learning_rate=3e-3"]

    def trainer(folder, *extra):
        cfg = load_config(SFTConfig, None, FAST + common + list(extra), model=str(folder / "sl"),
                          output_dir=str(folder / "rl"))
        return SFTTrainer(cfg, train_dataset=toy.sft_records(32))

    trainer(tmp_path / "before").train()
    os.rename(tmp_path / "before", tmp_path / "after")
    os.remove(tmp_path / "after" / "rl" / "checkpoint-000002" / "optimizer.pt")  # step 2 is redone
    finished = load_file(tmp_path / "after" / "rl" / "model.safetensors")
    trainer(tmp_path / "after", "resume_from=latest").train()
    again = load_file(tmp_path / "after" / "rl" / "model.safetensors")
    assert all(torch.equal(finished[k], again[k]) for k in finished)
    # a run saved before paths were hashed relative to the folder (absolute paths) still resumes
    legacy = tmp_path / "legacy"
    shutil.copytree(tmp_path / "after" / "sl", legacy / "sl")
    real_hash = SFTConfig.config_hash
    monkeypatch.setattr(SFTConfig, "config_hash", lambda self, portable=True: real_hash(self, portable=False))
    trainer(legacy).train()
    monkeypatch.undo()
    os.remove(legacy / "rl" / "checkpoint-000002" / "optimizer.pt")
    trainer(legacy, "resume_from=latest").train()
    # a model elsewhere is still a different run
    shutil.copytree(tmp_path / "after" / "sl", tmp_path / "other_model")
    cfg = load_config(SFTConfig, None, FAST + common + ["resume_from=latest"], model=str(tmp_path / "other_model"),
                      output_dir=str(tmp_path / "after" / "rl"))
    with pytest.raises(CheckpointError, match="belongs to another run"):
        SFTTrainer(cfg, train_dataset=toy.sft_records(32)).train()
