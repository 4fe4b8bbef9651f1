"""End to end, seeded: SFT then DPO on the built-in style-preference set raises the held-out
implicit-reward accuracy from 0 (policy = reference: every pair ties) to well above chance."""
import pytest

from alignfast.data import toy
from alignfast.trainers import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer, load_config

COMMON = ["disable_tqdm=true", "logging_steps=100", "max_length=32", "per_device_batch_size=16",
          "lr_scheduler=constant", "seed=0"]


def test_sft_then_dpo_raises_heldout_reward_accuracy(tiny_model_dir, tmp_path):
    sft = SFTTrainer(load_config(SFTConfig, None, COMMON + ["max_steps=30", "learning_rate=3e-3"],
                                 model=tiny_model_dir, output_dir=str(tmp_path / "sft")),
                     train_dataset=toy.sft_records(480, seed=0))
    sft.train()
    heldout = toy.style_preference_records(64, seed=1)  # other problems than the training pairs'
    dpo = DPOTrainer(load_config(DPOConfig, None, COMMON + ["max_steps=15", "learning_rate=1e-3", "beta=0.1"],
                                 model=str(tmp_path / "sft"), output_dir=str(tmp_path / "dpo")),
                     train_dataset=toy.style_preference_records(240, seed=0), eval_dataset=heldout)
    train_prompts = {tuple(e["prompt_ids"]) for e in dpo.train_data}
    assert sum(tuple(e["prompt_ids"]) not in train_prompts for e in dpo.eval_data) >= 32  # mostly unseen prompts
    before = dpo.evaluate()
    assert before["rewards/accuracies"] == 0.0 and before["loss"] == pytest.approx(0.6931, abs=1e-3)
    after = dpo.train()
    assert after["eval_rewards/accuracies"] >= 0.75, after
    assert after["eval_rewards/margins"] > 0.5 and after["eval_loss"] < 0.5, after
