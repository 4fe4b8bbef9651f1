"""alignfast.integrations.trl on KTOTrainer: loss, gradients and metrics equal TRL's own fused path for each
loss type (policy, KL completions and a separate reference model all served by alignfast).

Tiny random-init Llamas (alignfast.models.tiny), built here: nothing is downloaded.
"""
import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from alignfast.integrations import trl as atrl  # noqa: E402
from alignfast.models.tiny import tiny_llama, tiny_tokenizer  # noqa: E402
from trl_common import fresh_accelerate_state  # noqa: E402,F401 (autouse fixture)
from trl_common import KernelCalls, assert_same_as_trl, common_args, words  # noqa: E402


def make_trainer(tmp_path, trainer_cls=None, **overrides):
    tok = tiny_tokenizer()
    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": words(g, 2, 6), "completion": words(g, 1, 7), "label": i % 3 != 0} for i in range(8)]
    args = trl.KTOConfig(**{**common_args(tmp_path), "beta": 0.5, **overrides})
    return (trainer_cls or trl.KTOTrainer)(model=tiny_llama(tok, seed=0), ref_model=tiny_llama(tok, seed=1),
                                           args=args, train_dataset=datasets.Dataset.from_list(rows),
                                           processing_class=tok)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_loss_types_equal_trls(tmp_path, monkeypatch, loss_type):
    calls = KernelCalls(monkeypatch)
    trainer = make_trainer(tmp_path, loss_type=loss_type)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["label"].any() and not batch["label"].all()  # desirable and undesirable in one batch
    assert ("KL_input_ids" in batch) == (loss_type == "kto")  # the KL completions' calls are covered too
    metrics = assert_same_as_trl(trainer, batch, calls, options={"chunk_size": 7})
    assert {"entropy", "logits/chosen", "rewards/chosen", "rewards/rejected"} <= metrics.keys()
    if loss_type == "kto":
        assert metrics["kl"] > 0  # policy and reference differ: the KL term is live


def test_subclass_serves_policy_and_reference(tmp_path, monkeypatch):
    calls = KernelCalls(monkeypatch)
    trainer = make_trainer(tmp_path, trainer_cls=atrl.AlignfastKTOTrainer)
    assert all(atrl.fused_head.is_installed(m) for m in (trainer.model, trainer.ref_model))
    trainer.compute_loss(trainer.model, next(iter(trainer.get_train_dataloader()))).backward()
    assert calls.trl == 0 and calls.alignfast == 4  # policy, reference, and the KL completions of both
