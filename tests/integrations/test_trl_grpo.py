"""alignfast.integrations.trl on GRPOTrainer: the reference log-probs of a generation batch, and the loss,
gradients and metrics of each loss type, equal TRL's own fused path (temperature != 1, beta > 0, an entropy
bonus).

Tiny random-init Llamas (alignfast.models.tiny), built here: nothing is downloaded.
"""
import pytest
import torch

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")

from alignfast.integrations import trl as atrl  # noqa: E402
from helpers import assert_close  # noqa: E402
from trl_common import fresh_accelerate_state  # noqa: E402,F401 (autouse fixture)
from trl_common import KernelCalls, assert_same_as_trl, generation_batch, online_trainer  # noqa: E402

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "luspo", "sapo", "vespo"]


def make_trainer(tmp_path, trainer_cls=None, alignfast_options=None, **overrides):
    return online_trainer(tmp_path, trl.GRPOTrainer, trl.GRPOConfig, trainer_cls, alignfast_options,
                          **{"entropy_coef": 0.01, **overrides})


def test_grpo_reference_logprobs_and_every_loss_type_equal_trls(tmp_path, monkeypatch):
    calls = KernelCalls(monkeypatch)
    trainer = make_trainer(tmp_path)
    assert trainer.ref_model is not None and trainer.temperature == 0.7
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); read by the loss normalisers
    inputs = generation_batch(trainer)
    assert inputs["advantages"].abs().sum() > 0
    assert (inputs["prompt_mask"] == 0).any()  # 2 prompts of different lengths, 4 samples each

    atrl.use_alignfast(trainer)  # the reference model's calls, made while scoring the generations
    try:
        fused = generation_batch(trainer)
    finally:
        atrl.revert(trainer)
    assert torch.equal(fused["completion_ids"], inputs["completion_ids"])  # generation: TRL's forward
    assert_close(fused["ref_per_token_logps"], inputs["ref_per_token_logps"], rtol=1e-5, name="ref logps")

    for loss_type in LOSS_TYPES:
        # The loss type only changes TRL's arithmetic after the log-probs: one generation batch serves all.
        trainer.loss_type = loss_type
        metrics = assert_same_as_trl(trainer, inputs, calls)
        assert {"entropy", "kl"} <= metrics.keys() and metrics["kl"] > 0


def test_grpo_fp32_head_and_subclass(tmp_path, monkeypatch):
    """`cast_lm_head_to_fp32` (head and hidden states in fp32); `AlignfastGRPOTrainer` serves policy and
    reference."""
    calls = KernelCalls(monkeypatch)
    trainer = make_trainer(tmp_path, trainer_cls=atrl.AlignfastGRPOTrainer, cast_lm_head_to_fp32=True,
                           loss_type="dr_grpo", alignfast_options={"chunk_size": 3})
    assert all(atrl.fused_head.is_installed(m) for m in (trainer.model, trainer.ref_model))
    atrl.revert(trainer)  # TRL's own path first, for the comparison
    trainer.current_gradient_accumulation_steps = 1
    assert_same_as_trl(trainer, generation_batch(trainer), calls, options={"chunk_size": 3})
