"""alignfast.integrations.trl: SFTTrainer's loss, gradients and metrics equal TRL's own fused path.

A tiny random-init Llama and a word-level tokenizer built here: nothing is downloaded.
"""
import copy

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from alignfast.integrations import trl as atrl  # noqa: E402
from helpers import assert_close  # noqa: E402

WORDS = [f"w{i}" for i in range(40)]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """TRL's Trainer sets accelerate's process-wide state (mixed precision, ...); later tests that make
    their own Accelerator must not inherit it."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]",
                                                unk_token="[UNK]")


def make_trainer(tmp_path, config_overrides=None, **arg_overrides):
    tok = tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                                      initializer_range=0.2, pad_token_id=0, eos_token_id=2,
                                      **(config_overrides or {}))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": " ".join(WORDS[j] for j in torch.randint(0, 40, (int(n),), generator=g).tolist()),
             "completion": " ".join(WORDS[j] for j in torch.randint(0, 40, (int(m),), generator=g).tolist())}
            for n, m in zip(torch.randint(2, 6, (8,), generator=g), torch.randint(1, 7, (8,), generator=g))]
    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
                         use_cpu=True, logging_steps=1, save_strategy="no", dataloader_num_workers=0,
                         **arg_overrides)
    return trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                          processing_class=tok)


def loss_grads_metrics(trainer, batch, num_items_in_batch=None):
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(model, copy.copy(batch), num_items_in_batch=num_items_in_batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()
               if k in ("entropy", "mean_token_accuracy")}
    return loss.detach(), grads, metrics


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_sft_loss_grads_and_metrics_equal_trls(tmp_path, monkeypatch, loss_type):
    calls = []
    real = atrl.linear_logprobs
    monkeypatch.setattr(atrl, "linear_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    trainer = make_trainer(tmp_path, loss_type=loss_type)
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] == -100).any()  # prompts and padding are masked
    for num_items in (None, torch.tensor(23)):
        ref = loss_grads_metrics(trainer, batch, num_items)
        atrl.use_alignfast(trainer)
        n_calls = len(calls)
        fused = loss_grads_metrics(trainer, batch, num_items)
        assert len(calls) == n_calls + 1  # the loss came from alignfast's kernel
        atrl.revert(trainer)
        assert_close(fused[0], ref[0], rtol=1e-5, name="loss")
        assert fused[1].keys() == ref[1].keys() and len(ref[1]) == len(list(trainer.model.parameters()))
        for key in ref[1]:
            assert_close(fused[1][key], ref[1][key], rtol=1e-5, name=f"grad {key}")
        assert fused[2].keys() == {"entropy", "mean_token_accuracy"}
        assert fused[2]["entropy"] == pytest.approx(ref[2]["entropy"], rel=1e-5)
        assert fused[2]["mean_token_accuracy"] == pytest.approx(ref[2]["mean_token_accuracy"])


def test_subclass_trains_and_revert_restores_trls_head(tmp_path):
    trainer = make_trainer(tmp_path)
    trl_forward = trainer.model.__dict__["forward"]
    atrl.use_alignfast(trainer, backend="chunked")
    atrl.use_alignfast(trainer)  # re-applying keeps TRL's forward to go back to
    assert trainer.model.__dict__["forward"] is not trl_forward
    atrl.revert(trainer)
    assert trainer.model.__dict__["forward"] is trl_forward

    sub = atrl.AlignfastSFTTrainer(model=trainer.model, args=trainer.args,
                                   train_dataset=trainer.train_dataset,
                                   processing_class=trainer.processing_class,
                                   alignfast_options={"backend": "chunked"})
    result = sub.train()
    assert result.training_loss == result.training_loss and result.training_loss > 0  # finite, not NaN
    with pytest.raises(ValueError, match="unknown options"):
        atrl.use_alignfast(sub, temperature=2.0)
