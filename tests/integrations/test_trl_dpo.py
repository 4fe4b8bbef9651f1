"""alignfast.integrations.trl on DPOTrainer: loss, gradients and metrics equal TRL's own fused path for every
loss type (policy and a separate reference model both served by alignfast); less peak memory.

Tiny random-init Llamas (alignfast.models.tiny), built here: nothing is downloaded.
"""
import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from alignfast.integrations import trl as atrl  # noqa: E402
from alignfast.models.tiny import tiny_llama, tiny_tokenizer  # noqa: E402
from trl_common import fresh_accelerate_state  # noqa: E402,F401 (autouse fixture)
from trl_common import KernelCalls, assert_same_as_trl, common_args, peak_bytes, words  # noqa: E402

# Each alone, then TRL's other loss types together (one compute_loss sums them, with distinct weights).
LOSS_TYPES = [["sigmoid"], ["hinge"], ["ipo"], ["sft"], ["sigmoid_norm"],
              ["exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
               "apo_down", "discopop"]]


def make_trainer(tmp_path, vocab_size=None, trainer_cls=None, alignfast_options=None, **overrides):
    tok = tiny_tokenizer()
    model, ref = tiny_llama(tok, seed=0), tiny_llama(tok, seed=1)  # a reference unlike the policy
    if vocab_size:  # a vocab much wider than the hidden size, as in real LMs (extra rows: never targets)
        for m in (model, ref):
            m.resize_token_embeddings(vocab_size, mean_resizing=False)
    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": words(g, 2, 6), "chosen": words(g, 1, 7), "rejected": words(g, 1, 7)}
            for _ in range(8)]
    args = trl.DPOConfig(**{**common_args(tmp_path), "beta": 0.5, "label_smoothing": 0.1, **overrides})
    extra = {} if trainer_cls is None else {"alignfast_options": alignfast_options}
    return (trainer_cls or trl.DPOTrainer)(model=model, ref_model=ref, args=args, processing_class=tok,
                                           train_dataset=datasets.Dataset.from_list(rows), **extra)


def test_dpo_every_loss_type_equals_trls(tmp_path, monkeypatch):
    calls = KernelCalls(monkeypatch)
    trainer = make_trainer(tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["completion_mask"] == 0).any()  # prompts and padding are not scored
    for loss_types in LOSS_TYPES:
        # The loss type only changes TRL's arithmetic after the log-probs: one trainer serves them all.
        trainer.loss_types, trainer.loss_weights = loss_types, [1.0 + i / 10 for i in range(len(loss_types))]
        metrics = assert_same_as_trl(trainer, batch, calls)
        assert {"entropy", "logits/chosen", "mean_token_accuracy", "rewards/margins"} <= metrics.keys()
        assert metrics["rewards/margins"] != 0.0  # the reference path is live (policy != reference)


def test_dpo_wpo_ld_and_f_divergence_equal_trls(tmp_path, monkeypatch):
    """WPO weights (log_sum_sq_probs), LD-DPO's ld_alpha, an f-divergence; torch backend, chunks of 5 rows."""
    calls = KernelCalls(monkeypatch)
    trainer = make_trainer(tmp_path, use_weighting=True, ld_alpha=0.5, f_divergence_type="js_divergence")
    batch = next(iter(trainer.get_train_dataloader()))
    assert_same_as_trl(trainer, batch, calls, options={"backend": "chunked", "chunk_size": 5})


def test_a_model_from_an_earlier_trainer_is_served_again(tmp_path, monkeypatch):
    """SFT then DPO on the same model object, use_alignfast on both: the DPO trainer's TRL forward sits on
    top of the SFT stage's alignfast one. It stayed TRL's (use_alignfast found the old state and changed
    nothing, while is_installed said True)."""
    calls = KernelCalls(monkeypatch)
    dpo = make_trainer(tmp_path / "dpo")
    tok = dpo.processing_class
    rows = [{"prompt": "a b", "completion": "c d"}] * 4
    sft = trl.SFTTrainer(model=tiny_llama(tok, seed=0), args=trl.SFTConfig(**common_args(tmp_path / "sft")),
                         processing_class=tok, train_dataset=datasets.Dataset.from_list(rows))
    atrl.use_alignfast(sft)
    sft.train()
    again = trl.DPOTrainer(model=sft.model, ref_model=dpo.ref_model, args=dpo.args, processing_class=tok,
                           train_dataset=dpo.train_dataset)
    batch = next(iter(again.get_train_dataloader()))
    assert_same_as_trl(again, batch, calls)  # TRL's path first, then every fused call alignfast's
    atrl.use_alignfast(again)
    atrl.revert(again)
    again.model.generate(torch.tensor([[3, 4]]), max_new_tokens=2, do_sample=False)  # no recursion


def test_dpo_peak_memory_is_lower(tmp_path):
    """Beyond the parameters' gradients, alignfast holds less than half of one fp32 [B·T, V] logits block
    (completion rows only, `chunk_size` of them at a time); TRL's CPU head holds [min(B·T, 4096), 32768]
    blocks (whatever V is) in forward and backward."""
    vocab = 4096
    trainer = make_trainer(tmp_path, vocab_size=vocab)
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    model.train()

    def peak():
        model.zero_grad(set_to_none=True)
        return peak_bytes(lambda: trainer.compute_loss(model, dict(batch)).backward())

    peak()  # warm-up: lazily created state is not part of either peak
    trl_peak = peak()
    atrl.use_alignfast(trainer, chunk_size=8)
    try:
        ours = peak()
    finally:
        atrl.revert(trainer)
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    block = batch["input_ids"].numel() * vocab * 4
    assert ours - grads < block / 2, f"alignfast: {(ours - grads) / 2**20:.3f} MiB beyond the gradients"
    assert ours < trl_peak, f"alignfast {ours / 2**20:.2f} MiB vs TRL {trl_peak / 2**20:.2f} MiB"


def test_subclass_trains_under_mixed_precision_and_reverts(tmp_path, monkeypatch):
    """bf16 on CPU: accelerate wraps the reference's forward (in __init__) and the policy's (in train()) in
    autocast; alignfast serves the calls inside those wrappers, and revert hands them back to TRL's head."""
    from alignfast.integrations.transformers import backbone

    calls = KernelCalls(monkeypatch)
    trainer = make_trainer(tmp_path, trainer_cls=atrl.AlignfastDPOTrainer, bf16=True,
                           alignfast_options={"backend": "chunked"})
    wrapper = trainer.ref_model.__dict__["_alignfast_trl"].previous  # what alignfast found and replaced
    trls = trainer.ref_model.__dict__["_original_forward"]  # accelerate wrapped TRL's fused forward
    assert "fused_lm_head" in trls.__func__.__code__.co_varnames and wrapper is not trls
    assert all(atrl.fused_head.is_installed(m) for m in (trainer.model, trainer.ref_model))
    autocast = []
    for m in (trainer.model, trainer.ref_model):
        backbone(m).register_forward_hook(lambda *_: autocast.append(torch.is_autocast_enabled("cpu")))

    result = trainer.train()
    assert result.training_loss == result.training_loss  # finite, not NaN
    assert calls.trl == 0 and calls.alignfast >= 2 and autocast and all(autocast)

    atrl.revert(trainer)
    assert trainer.ref_model.__dict__["forward"] is wrapper
    assert not any(atrl.fused_head.is_installed(m) for m in (trainer.model, trainer.ref_model))
    trainer.compute_loss(trainer.model, next(iter(trainer.get_train_dataloader())))
    assert calls.trl >= 2  # policy (inside accelerate's wrapper) and reference: TRL's head again
