"""alignfast.integrations.trl: SFTTrainer's loss, gradients and metrics equal TRL's own fused path;
options, revert, RewardTrainer and unsupported trainers.

A tiny random-init Llama and a word-level tokenizer built here: nothing is downloaded.
"""
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from alignfast.integrations import trl as atrl  # noqa: E402
from trl_common import fresh_accelerate_state  # noqa: E402,F401 (autouse fixture)
from trl_common import KernelCalls, assert_same_as_trl  # noqa: E402

WORDS = [f"w{i}" for i in range(40)]


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]",
                                                unk_token="[UNK]")


def make_trainer(tmp_path, config_overrides=None, family="Llama", **arg_overrides):
    tok = tokenizer()
    config = getattr(transformers, f"{family}Config")(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, initializer_range=0.2, pad_token_id=0, eos_token_id=2, **(config_overrides or {}))
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(config)
    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": " ".join(WORDS[j] for j in torch.randint(0, 40, (int(n),), generator=g).tolist()),
             "completion": " ".join(WORDS[j] for j in torch.randint(0, 40, (int(m),), generator=g).tolist())}
            for n, m in zip(torch.randint(2, 6, (8,), generator=g), torch.randint(1, 7, (8,), generator=g))]
    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
                         use_cpu=True, logging_steps=1, save_strategy="no", dataloader_num_workers=0,
                         **arg_overrides)
    return trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                          processing_class=tok)


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_sft_loss_grads_and_metrics_equal_trls(tmp_path, monkeypatch, loss_type):
    calls = KernelCalls(monkeypatch)
    trainer = make_trainer(tmp_path, loss_type=loss_type)
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] == -100).any()  # prompts and padding are masked
    for num_items in (None, torch.tensor(23)):
        metrics = assert_same_as_trl(trainer, batch, calls, num_items_in_batch=num_items)
        assert {"entropy", "mean_token_accuracy"} <= metrics.keys()


def test_moe_router_aux_loss_equals_trls(tmp_path, monkeypatch):
    """A Mixtral with router logits on: the load-balancing term joins the loss as in TRL (it crashed:
    the pair (term, coefficient) was multiplied by the coefficient)."""
    calls = KernelCalls(monkeypatch)
    trainer = make_trainer(tmp_path, family="Mixtral", config_overrides=dict(
        num_local_experts=4, num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.3))
    batch = next(iter(trainer.get_train_dataloader()))
    metrics = assert_same_as_trl(trainer, batch, calls)
    assert metrics["aux_loss"] > 0


def test_subclass_trains_and_revert_restores_trls_head(tmp_path):
    trainer = make_trainer(tmp_path)
    trl_forward = trainer.model.__dict__["forward"]
    with pytest.raises(ValueError, match="unknown options"):
        atrl.use_alignfast(trainer, temperature=2.0)
    assert trainer.model.__dict__["forward"] is trl_forward
    atrl.use_alignfast(trainer, backend="chunked")
    atrl.use_alignfast(trainer)  # re-applying keeps TRL's forward to go back to
    assert trainer.model.__dict__["forward"] is not trl_forward
    atrl.revert(trainer)
    assert trainer.model.__dict__["forward"] is trl_forward

    sub = atrl.AlignfastSFTTrainer(model=trainer.model, args=trainer.args,
                                   train_dataset=trainer.train_dataset,
                                   processing_class=trainer.processing_class,
                                   alignfast_options={"backend": "chunked"})
    assert atrl.fused_head.is_installed(sub.model)
    result = sub.train()
    assert result.training_loss == result.training_loss and result.training_loss > 0  # finite, not NaN


def test_reward_trainer_is_left_unchanged_with_a_warning(tmp_path):
    tok = tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, intermediate_size=32,
                                      pad_token_id=0, num_labels=1)
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(config)
    rows = [{"chosen": "w1 w2 w3", "rejected": "w4 w5"}, {"chosen": "w6", "rejected": "w7 w8"}]
    args = trl.RewardConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no")
    trainer = trl.RewardTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                processing_class=tok)
    forward = trainer.model.forward
    with pytest.warns(UserWarning, match="no vocab projection"):
        assert atrl.use_alignfast(trainer) is trainer
    assert trainer.model.forward == forward and "forward" not in trainer.model.__dict__
    assert atrl.revert(trainer) is trainer


def test_unsupported_trainers_and_models_are_rejected(tmp_path):
    sft = make_trainer(tmp_path)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(TypeError, match="use_alignfast supports trl.SFTTrainer"):
        atrl.use_alignfast(transformers.Trainer(model=sft.model, args=args))
    HeadSpec = atrl.fused_head.HeadSpec
    with pytest.raises(ValueError, match="unknown fused-head outputs"):
        HeadSpec(("log_probs", "logits"))
    plain = transformers.LlamaForCausalLM(sft.model.config)  # no fused head from TRL
    with pytest.raises(RuntimeError, match="no fused LM head from TRL"):
        atrl.fused_head.install(sft, [(sft.model, HeadSpec()), (plain, HeadSpec())], {})
    assert not atrl.fused_head.is_installed(sft.model)  # all models are checked before any is changed
    # option values are checked when applied, not at the first training step
    for options, error, match in [({"backend": "bogus"}, ValueError, "backend='bogus' is unknown"),
                                  ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int")]:
        with pytest.raises(error, match=match):
            atrl.use_alignfast(sft, **options)
        assert not atrl.fused_head.is_installed(sft.model)
    # a backend of another device is named, not resolved: Trainer may place the model there in train()
    atrl.use_alignfast(sft, backend="cuda")
    atrl.revert(sft)


def test_a_subclass_with_its_own_loss_is_warned_about(tmp_path):
    """TRL's experimental GKD/GOLD trainers subclass SFTTrainer with a loss that makes no fused-head call:
    applying alignfast to them changed nothing, silently."""
    sft = make_trainer(tmp_path)

    class OwnLoss(trl.SFTTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            return super().compute_loss(model, inputs, *args, **kwargs)

    sft.__class__ = OwnLoss
    with pytest.warns(UserWarning, match="OwnLoss overrides SFTTrainer.compute_loss"):
        atrl.use_alignfast(sft)
    sft.__class__ = atrl.AlignfastSFTTrainer   # the adapter's own subclass overrides none of them
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        atrl.use_alignfast(sft)
