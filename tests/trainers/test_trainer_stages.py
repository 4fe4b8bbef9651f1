"""Each trainer trains the tiny model a few steps and its loss falls on the toy data."""
import json
import math
import os

import pytest
import torch

from trainer_helpers import make_trainer

from alignfast.data import toy
from alignfast.trainers import SFTConfig, load_config

LR = {"sft": 3e-3, "reward": 3e-3, "dpo": 3e-3, "kto": 3e-3}


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "kto"])
def test_loss_falls(stage, tiny_model_dir, tmp_path):
    extra = ["beta=0.5"] if stage in ("dpo", "kto") else []
    tr = make_trainer(stage, tiny_model_dir, tmp_path, [f"learning_rate={LR[stage]}", "max_steps=12"] + extra)
    before = tr.evaluate(tr.train_data)["loss"]
    tr.train()
    after = tr.evaluate(tr.train_data)["loss"]
    assert after < before - 0.05 * abs(before), (stage, before, after)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 13))
    assert os.path.isfile(tmp_path / "model.safetensors") and os.path.isfile(tmp_path / "tokenizer.json")


def test_reward_accuracy_and_saved_as_sequence_classifier(tiny_model_dir, tmp_path):
    tr = make_trainer("reward", tiny_model_dir, tmp_path, ["learning_rate=3e-3", "max_steps=12",
                                                            "center_rewards_coefficient=0.01"])
    tr.train()
    m = tr.evaluate(tr.train_data)
    assert m["accuracy"] > 0.7, m
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(str(tmp_path))
    assert rm.config.num_labels == 1


def test_dpo_precomputed_reference_matches_live_reference(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    live = make_trainer("dpo", tiny_model_dir, tmp_path / "a", ["max_steps=2", "learning_rate=1e-3"])
    pre = make_trainer("dpo", tiny_model_dir, tmp_path / "b", ["max_steps=2", "learning_rate=1e-3",
                                                               "precompute_ref_logps=true"])
    assert pre.reference.model is None  # dropped after precomputation
    assert "ref_chosen_logps" in pre.train_data[0]
    a, b = live.train(), pre.train()
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for pa, pb in zip(live.model.parameters(), pre.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["hinge", "ipo"])
def test_dpo_loss_types_run(loss_type, tiny_model_dir, tmp_path):
    out = make_trainer("dpo", tiny_model_dir, tmp_path, ["max_steps=1", f"loss_type={loss_type}"]).train()
    assert torch.isfinite(torch.tensor(out["loss"]))


def test_kto_weights_and_kl(tiny_model_dir, tmp_path):
    tr = make_trainer("kto", tiny_model_dir, tmp_path, ["max_steps=3", "learning_rate=3e-3",
                                                         "desirable_weight=1.5", "undesirable_weight=0.5"])
    out = tr.train()
    assert out["kl"] >= 0 and {"rewards/chosen", "rewards/rejected"} <= set(out)


def test_gradient_accumulation_matches_one_big_batch(tiny_model_dir, tmp_path):
    """Token-count normalisation across micro-batches: 2 × 8 with accumulation == 1 × 16.

    adam_epsilon ≫ |g| makes each AdamW step ≈ lr·m̂ (linear in the gradients), so the parameters
    differ only by float rounding of the gradients; with the default 1e-8 a step is ≈ lr·sign(g),
    and a near-zero gradient entry summed in another order can flip it."""
    common = ["max_steps=2", "learning_rate=1e-3", "adam_epsilon=1.0"]
    a = make_trainer("sft", tiny_model_dir, tmp_path / "a", common + ["per_device_batch_size=16"])
    b = make_trainer("sft", tiny_model_dir, tmp_path / "b", common + ["per_device_batch_size=8",
                                                                      "gradient_accumulation_steps=2"])
    start = [p.detach().clone() for p in a.model.parameters()]
    ra, rb = a.train(), b.train()
    assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
    # rounding allowed: ~8 fp32 ulps of a parameter (each run rounds its own updates into it), and
    # 1e-10 absolute (~1e-6 of the largest update: the gradients summed in another order)
    rtol, atol = 1e-6, 1e-10
    after = torch.cat([pa.detach().flatten() for pa in a.model.parameters()])
    update = (after - torch.cat([p0.flatten() for p0 in start])).abs()
    k = update.argmax()
    assert 1e-2 * update[k] > atol + rtol * after[k].abs(), "a 1% normalisation error of the largest update must show"
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol)


def test_no_trainer_computes_logits(tiny_model_dir, tmp_path, monkeypatch):
    """The lm_head module is never called: the fused losses take its weight."""
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    def forbidden(*a, **k):
        raise AssertionError("the causal LM's forward (logits) was called")

    monkeypatch.setattr(LlamaForCausalLM, "forward", forbidden)
    for stage in ("sft", "dpo", "kto"):
        tr = make_trainer(stage, tiny_model_dir, tmp_path / stage, ["max_steps=1"])
        tr.model.causal_lm.lm_head.register_forward_hook(lambda *a: forbidden())
        tr.train()


@pytest.mark.parametrize("overrides", [
    ["method=simpo", "beta=2.0", "simpo_gamma=0.5"],
    ["method=orpo", "beta=0.1"],
    ["method=cpo", "loss_type=sigmoid", "cpo_alpha=1.0"],
    ["method=cpo", "loss_type=simpo"],
    ["f_divergence=js_divergence"],
    ["f_divergence=alpha_divergence", "f_alpha_divergence_coef=0.3"],
], ids=lambda o: "-".join(v.split("=")[1] for v in o[:2]))
def test_preference_methods_train(overrides, tiny_model_dir, tmp_path):
    """SimPO/ORPO/CPO (no reference model is built) and DPO's f-divergences: the loss falls."""
    tr = make_trainer("dpo", tiny_model_dir, tmp_path, ["max_steps=6", "learning_rate=3e-3"] + overrides)
    assert (tr.reference is None) == any(o.startswith("method=") for o in overrides)
    before = tr.evaluate(tr.train_data)["loss"]
    tr.train()
    after = tr.evaluate(tr.train_data)["loss"]
    assert after < before, (overrides, before, after)


def test_dpo_trainer_matches_functional_dpo_loss(tiny_model_dir, tmp_path):
    """The fused module inside the trainer gives the loss `dpo_loss` gives on the sequence log-probs."""
    from alignfast.losses import dpo_loss
    from alignfast.trainers.sequence import sequence_logps

    tr = make_trainer("dpo", tiny_model_dir, tmp_path, ["max_steps=1", "loss_type=ipo", "beta=0.3"])
    with torch.no_grad():
        tr.model.causal_lm.lm_head.weight.add_(0.05 * torch.randn_like(tr.model.causal_lm.lm_head.weight))
    batch = tr.micro_batches(0)[0]
    loss_sum, metrics = tr.compute_loss(tr.model, batch)
    logps, lengths = sequence_logps(tr.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    ref = tr.reference_logps(batch)
    losses, rc, rr = dpo_loss(*logps.chunk(2), *ref.chunk(2), beta=0.3, loss_type="ipo",
                              chosen_lengths=lengths.chunk(2)[0], rejected_lengths=lengths.chunk(2)[1])
    torch.testing.assert_close(loss_sum, losses.sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(metrics["rewards/margins"], (rc - rr).sum(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("choice,expected", [("auto", "sdpa"), ("eager", "eager")])
def test_attn_implementation_reaches_the_model(choice, expected, tiny_model_dir):
    """auto is SDPA without a GPU and flash_attn (flash_attention_2 where both exist)."""
    from alignfast.trainers.modeling import attn_implementation, load_causal_lm

    cfg = load_config(SFTConfig, None, [f"attn_implementation={choice}"], model=tiny_model_dir)
    assert attn_implementation(cfg) == expected
    assert load_causal_lm(cfg).config._attn_implementation == expected


@pytest.mark.parametrize("stage", ["dpo", "kto", "reward"])
def test_dropout_is_off_in_the_preference_stages(stage, tiny_model_dir, tmp_path):
    """As TRL's disable_dropout=True default: at the first step the policy is its reference, so DPO's
    loss is exactly log 2 and KTO's 1/2 (with dropout on, both carried dropout noise); reward models too."""
    import math
    import shutil

    from transformers import AutoModelForCausalLM

    with_dropout = str(tmp_path / "dropout")
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, attention_dropout=0.3).save_pretrained(with_dropout)
    for name in os.listdir(tiny_model_dir):  # the tokenizer's files
        if "token" in name or name.endswith(".jinja"):
            shutil.copy(os.path.join(tiny_model_dir, name), with_dropout)
    tr = make_trainer(stage, with_dropout, tmp_path / "out", ["max_steps=1"])
    rates = [m.p for m in tr.model.modules() if isinstance(m, torch.nn.Dropout)]
    rates += [m.attention_dropout for m in tr.model.modules() if isinstance(getattr(m, "attention_dropout", None),
                                                                            float)]
    assert rates and all(r == 0.0 for r in rates)
    if stage == "reward":
        return
    tr.model.train()
    batch = tr.micro_batches(0)[0]
    loss_sum, _ = tr.compute_loss(tr.model, batch)
    mean = float(loss_sum.detach()) / tr.count_items(batch)
    assert mean == pytest.approx(math.log(2) if stage == "dpo" else 0.5, abs=1e-6)


def test_kto_eval_without_a_chosen_example_leaves_the_metric_out(tiny_model_dir, tmp_path):
    """A metric nothing counted is absent, not NaN (bare NaN is not JSON: metrics.jsonl readers choke)."""
    records = toy.unpaired_records(32)
    undesirable = [r for r in records if not r["label"]]
    tr = make_trainer("kto", tiny_model_dir, tmp_path, ["max_steps=1"], records=records, eval_dataset=undesirable[:4])
    out = tr.evaluate()
    assert "rewards/rejected" in out and "rewards/chosen" not in out
    assert all(math.isfinite(v) for v in out.values() if isinstance(v, float)), out
