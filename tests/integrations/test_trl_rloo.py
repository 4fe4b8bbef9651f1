"""alignfast.integrations.trl on RLOOTrainer (the same fused-head seam as GRPOTrainer): the reference log-probs
of a generation batch, and the loss, gradients and metrics, equal TRL's own fused path (temperature != 1,
beta > 0); `AlignfastRLOOTrainer` serves policy and reference.

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


def make_trainer(tmp_path, trainer_cls=None, alignfast_options=None):
    return online_trainer(tmp_path, trl.RLOOTrainer, trl.RLOOConfig, trainer_cls, alignfast_options)


def off_policy(inputs):
    """Sequence log-probs of an older policy: on-policy, ρ = 1 and the leave-one-out advantages cancel the
    loss to rounding (~1e-8), which no relative tolerance compares."""
    shifted = dict(inputs)
    shifted["old_logps"] = inputs["old_logps"] + 0.3 * torch.randn(inputs["old_logps"].shape,
                                                                   generator=torch.Generator().manual_seed(2))
    return shifted


def test_rloo_reference_logprobs_loss_gradients_and_metrics_equal_trls(tmp_path, monkeypatch):
    calls = KernelCalls(monkeypatch)
    trainer = make_trainer(tmp_path)
    assert trainer.ref_model is not None and trainer.temperature == 0.7
    trainer.current_gradient_accumulation_steps = 1
    inputs = generation_batch(trainer)
    assert inputs["advantages"].abs().sum() > 0

    atrl.use_alignfast(trainer)  # the reference model's calls, made while scoring the generations
    try:
        fused = generation_batch(trainer)
    finally:
        atrl.revert(trainer)
    assert torch.equal(fused["completion_ids"], inputs["completion_ids"])
    for key in [k for k in inputs if k.endswith("logps") and torch.is_tensor(inputs[k])]:
        assert_close(fused[key], inputs[key], rtol=1e-5, name=key)
    metrics = assert_same_as_trl(trainer, off_policy(inputs), calls)
    assert metrics["clip_ratio/region_mean"] > 0  # (RLOO puts its KL into the rewards, not the loss)


def test_rloo_subclass(tmp_path, monkeypatch):
    calls = KernelCalls(monkeypatch)
    trainer = make_trainer(tmp_path, trainer_cls=atrl.AlignfastRLOOTrainer, alignfast_options={"chunk_size": 3})
    assert all(atrl.fused_head.is_installed(m) for m in (trainer.model, trainer.ref_model))
    atrl.revert(trainer)  # TRL's own path first, for the comparison
    trainer.current_gradient_accumulation_steps = 1
    assert_same_as_trl(trainer, off_policy(generation_batch(trainer)), calls, options={"chunk_size": 3})
