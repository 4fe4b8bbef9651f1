"""alignfast.integrations.trl on RLOOTrainer (the same fused-head seam as GRPOTrainer): the reference log-probs
of a generation batch, and the loss, gradients and metrics, equal TRL's own fused path (temperature != 1,
beta > 0); `AlignfastRLOOTrainer` serves policy and reference.

Tiny random-init Llamas (alignfast.models.tiny), built here: nothing is downloaded.
"""
import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from alignfast.integrations import trl as atrl  # noqa: E402
from alignfast.models.tiny import tiny_llama, tiny_tokenizer  # noqa: E402
from helpers import assert_close  # noqa: E402
from trl_common import fresh_accelerate_state  # noqa: E402,F401 (autouse fixture)
from trl_common import KernelCalls, assert_same_as_trl, common_args, words  # noqa: E402


def letter_a(completions, **_):
    return [c.count("a") + 0.1 * len(c) for c in completions]


def make_trainer(tmp_path, trainer_cls=None, alignfast_options=None, **overrides):
    tok = tiny_tokenizer()
    ref_dir = tmp_path / "ref"
    tiny_llama(tok, seed=1).save_pretrained(ref_dir)
    model = tiny_llama(tok, seed=0)
    model.config._name_or_path = str(ref_dir)  # RLOOTrainer loads its reference model from here
    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": words(g, 2, 6)} for _ in range(8)]
    args = trl.RLOOConfig(**{**common_args(tmp_path), "per_device_train_batch_size": 8, "num_generations": 4,
                             "max_completion_length": 6, "beta": 0.2, "temperature": 0.7, **overrides})
    extra = {} if trainer_cls is None else {"alignfast_options": alignfast_options}
    return (trainer_cls or trl.RLOOTrainer)(model=model, reward_funcs=letter_a, args=args, processing_class=tok,
                                            train_dataset=datasets.Dataset.from_list(rows), **extra)


def generation_batch(trainer):
    prompts = next(iter(trainer.get_train_dataloader()))
    torch.manual_seed(0)
    return trainer._generate_and_score_completions(prompts)


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
