"""GRPOTrainer: every loss type runs, one update's gradient against a float64 reference written out
here, accumulation invariance, group advantages, no reference at β = 0, exact resume, config errors,
and a verifiable reward that rises."""
import copy
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from alignfast.data import toy
from alignfast.losses.grpo import GRPO_LOSS_TYPES
from alignfast.trainers.config import load_config
from alignfast.trainers.grpo import GRPOConfig, GRPOTrainer, group_advantages

FAST = ["disable_tqdm=true", "logging_steps=1", "max_length=32", "max_new_tokens=8", "num_generations=4"]


def prompts(n=16):
    """Prompt records with a `target` column for the reward functions."""
    return [{"prompt": r["prompt"], "target": "x"} for r in toy.sft_records(n)]


def contains_target(prompts, completions, target, **kw):
    """1 if the completion contains the record's target character (a verifiable reward)."""
    return [float(t in c) for t, c in zip(target, completions)]


def digit_fraction(prompts, completions, **kw):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def make(model_dir, out_dir, overrides=(), reward_funcs=(digit_fraction,), records=None, **kw):
    cfg = load_config(GRPOConfig, None, FAST + list(overrides), model=model_dir, output_dir=str(out_dir))
    return GRPOTrainer(cfg, train_dataset=records or prompts(), reward_funcs=list(reward_funcs), **kw)


def causal_lm(trainer):
    return trainer.policy_lm()


def params(trainer):
    return {n: p.detach().clone() for n, p in causal_lm(trainer).named_parameters()}


def record(trainer):
    """Per optimizer update: the weights it started from and the gradient it applied; the rollouts."""
    updates, rollouts = [], []
    step, sample = trainer.optimizer.step, trainer.sample

    def recording_step(*a, **k):
        lm = causal_lm(trainer)
        updates[-1]["grads"] = {n: p.grad.detach().clone() for n, p in lm.named_parameters()}
        return step(*a, **k)

    def recording_sample(examples, seed, sampling=None):
        completions = sample(examples, seed, sampling)
        rollouts.append((examples, completions))
        return completions

    training_step = trainer.training_step

    def recording_training_step(micro):
        updates.append({"params": params(trainer)})
        return training_step(micro)

    trainer.optimizer.step, trainer.sample = recording_step, recording_sample
    trainer.training_step = recording_training_step
    return updates, rollouts


def assert_grads_close(a, b, rtol):
    for name in a:
        err = (a[name] - b[name]).norm() / a[name].norm().clamp(min=1e-30)
        assert err < rtol, f"{name}: relative error {float(err):.2e}"


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_every_loss_type_trains(tiny_model_dir, tmp_path, loss_type):
    """Two steps with β > 0, μ = 2 and two mini-batches per pass; a config function plus a
    constructor function, weighted."""
    tr = make(tiny_model_dir, tmp_path, [f"loss_type={loss_type}", "per_device_batch_size=2", "max_steps=2",
                                         "gradient_accumulation_steps=2", "num_mini_batches=2", "num_iterations=2",
                                         "beta=0.05", "learning_rate=1e-3", "reward_weights=[1.0, 0.5]",
                                         "reward_funcs=[test_grpo_trainer:contains_target]"])
    before = params(tr)
    out = tr.train()
    ratio_metric = {"cispo": ("cispo_clip_ratio",), "sapo": ()}.get(loss_type, ("clip_ratio/region_mean",))
    for key in ("loss", "reward", "reward_std", "rewards/contains_target", "rewards/digit_fraction", "kl",
                "entropy", "completion_length", "eos_fraction", "grad_norm") + ratio_metric:
        assert math.isfinite(out[key]), (key, out)
    assert out["reward"] == pytest.approx(out["rewards/contains_target"] + 0.5 * out["rewards/digit_fraction"],
                                          abs=1e-6)
    assert 0 < out["completion_length"] <= 8
    after = params(tr)
    assert any(not torch.equal(before[n], after[n]) for n in before)


def float64_logps(lm64, weights, rows, temperature, grad=False):
    """[per row: log π(c_j | p, c_<j) / T, 1-D] with `weights` loaded into the float64 model, one row
    at a time (no padding), from the full logits."""
    lm64.load_state_dict({n: w.double() for n, w in weights.items()})
    lm64.requires_grad_(grad)
    out = []
    for p, c in rows:
        logits = lm64(input_ids=torch.tensor([p + c])).logits[0].double() / temperature
        logp = torch.log_softmax(logits[len(p) - 1:-1], -1)
        out.append(logp.gather(-1, torch.tensor(c)[:, None])[:, 0])
    return out


@pytest.mark.parametrize("loss_type,mask_truncated", [("grpo", False), ("dapo", False), ("dr_grpo", True)])
def test_update_gradient_matches_float64_reference(tiny_model_dir, tmp_path, loss_type, mask_truncated):
    """β > 0, μ = 2, two micro-batches, temperature 0.8, clipping active in the second update: the gradient
    of each update equals the GRPO formula written out here on float64 logits."""
    beta, eps_low, eps_high, temp, G = 0.1, 0.2, 0.28, 0.8, 4
    tr = make(tiny_model_dir, tmp_path, [f"loss_type={loss_type}", "per_device_batch_size=2", "max_steps=1",
                                         "gradient_accumulation_steps=2", "num_iterations=2", f"beta={beta}",
                                         f"epsilon={eps_low}", f"epsilon_high={eps_high}", f"temperature={temp}",
                                         "learning_rate=3e-2", "max_grad_norm=0", "lr_scheduler=constant",
                                         f"mask_truncated_completions={mask_truncated}"])
    updates, rollouts = record(tr)
    tr.train()
    assert len(updates) == 2
    (examples, completions), = rollouts
    rows = [(e["prompt_ids"], c) for e, c in zip(examples, completions)]
    eos = tr.tokenizer.eos_token_id
    keep = torch.tensor([not mask_truncated or c[-1] == eos for c in completions], dtype=torch.float64)
    if mask_truncated:
        assert 0 < keep.sum() < len(keep)  # the seeded rollout has both kinds

    # advantages by hand: groups of G consecutive samples
    texts = tr.tokenizer.batch_decode(completions, skip_special_tokens=True)
    r = torch.tensor(digit_fraction(None, texts), dtype=torch.float64).view(-1, G)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)

    lm64 = copy.deepcopy(causal_lm(tr)).double()
    initial = float64_logps(lm64, updates[0]["params"], rows, temp)  # the rollout policy and the reference
    clipped = 0
    for update in updates:
        lm64.zero_grad(set_to_none=True)
        current = float64_logps(lm64, update["params"], rows, temp, grad=True)
        per_row = []
        for i, (lp, old, ref) in enumerate(zip(current, initial, initial)):
            ratio = torch.exp(lp - old)
            clip = ratio.clamp(1 - eps_low, 1 + eps_high)
            clipped += int(((ratio != clip) & ((ratio - clip) * adv[i] > 0)).sum())
            k3 = torch.exp(ref - lp) - (ref - lp) - 1
            # the KL weighted by ρ (use_bias_correction_kl, TRL's default): its gradient counts even at ρ = 1
            per_row.append((-torch.minimum(ratio * adv[i], clip * adv[i]) + beta * k3 * ratio) * keep[i])
        if loss_type == "grpo":
            loss = sum(t.sum() / max(float(keep[i]) * len(t), 1.0) for i, t in enumerate(per_row)) / len(rows)
        elif loss_type == "dapo":
            loss = sum(t.sum() for t in per_row) / sum(len(t) * float(k) for t, k in zip(per_row, keep))
        else:  # dr_grpo: the constant is max_new_tokens per completion
            loss = sum(t.sum() for t in per_row) / (len(rows) * 8)
        loss.backward()
        want = {n: p.grad.float() for n, p in lm64.named_parameters()
                if n in ("lm_head.weight", "model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight")}
        assert_grads_close(want, update["grads"], rtol=1e-5)
    assert clipped > 0  # the second update moved π enough to clip some tokens


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_accumulation_invariance(tiny_model_dir, tmp_path, loss_type):
    """2 micro-batches of 2 prompts give the first update of 1 micro-batch of 4 (the same prompts)."""
    grads = []
    for batch, accumulation in ((2, 2), (4, 1)):
        tr = make(tiny_model_dir, tmp_path / f"{batch}",
                  [f"loss_type={loss_type}", f"per_device_batch_size={batch}", "max_steps=1", "beta=0.1",
                   f"gradient_accumulation_steps={accumulation}", "max_grad_norm=0"])
        updates, _ = record(tr)
        tr.train()
        grads.append(updates[0]["grads"])
    assert_grads_close(grads[1], grads[0], rtol=1e-5)


def test_group_advantages():
    r = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 2.0, 5.0, 0.3, 0.3, 0.3, 0.3])
    scaled, raw = group_advantages(r, 4, True), group_advantages(r, 4, False)
    assert torch.equal(scaled[:4], torch.zeros(4)) and torch.equal(raw[8:], torch.zeros(4))
    g = r[4:8].double()
    torch.testing.assert_close(raw[4:8], (g - 2.0).float())
    torch.testing.assert_close(scaled[4:8], ((g - 2.0) / (g.std() + 1e-4)).float())  # unbiased std
    assert scaled[4:8].sum().abs() < 1e-6
    with pytest.raises(ValueError, match="rewards must be"):
        group_advantages(r[:10], 4)


def constant(prompts, completions, **kw):
    return [0.5] * len(completions)


def test_constant_rewards_and_beta_zero_leave_the_policy_unchanged(tiny_model_dir, tmp_path, monkeypatch):
    """β = 0: no reference model is ever built; constant rewards: every advantage 0, a zero gradient."""
    import alignfast.trainers.grpo as grpo

    def no_reference(*a, **k):
        raise AssertionError("a reference model was built with beta=0")

    monkeypatch.setattr(grpo, "ReferencePolicy", no_reference)
    tr = make(tiny_model_dir, tmp_path, ["per_device_batch_size=2", "max_steps=1", "beta=0", "learning_rate=1e-2"],
              reward_funcs=[constant])
    assert tr.reference is None and "ref_logps" not in tr.collator.token_fields
    before = params(tr)
    out = tr.train()
    assert "kl" not in out and out["reward_std"] == 0 and out["frac_reward_zero_std"] == 1
    after = params(tr)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    run = ["per_device_batch_size=2", "max_steps=4", "save_steps=2", "num_iterations=2", "beta=0.05",
           "learning_rate=1e-3", "save_total_limit=5"]
    make(tiny_model_dir, tmp_path / "full", run).train()
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-000002", tmp_path / "resumed" / "checkpoint-000002")
    resumed = make(tiny_model_dir, tmp_path / "resumed", run + ["resume_from=latest"])
    resumed.train()
    assert resumed.step == 4
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("full", "resumed"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("override,key", [("num_generations=1", "num_generations"), ("epsilon=-0.1", "epsilon"),
                                          ("loss_type=ppo", "loss_type"), ("beta=-1", "beta"),
                                          ("num_iterations=0", "num_iterations"), ("temperature=0", "temperature"),
                                          ("epsilon_high=-1", "epsilon_high")])
def test_bad_config_names_the_key(tiny_model_dir, tmp_path, override, key):
    with pytest.raises(ValueError, match=key):
        load_config(GRPOConfig, None, FAST + [override], model=tiny_model_dir, output_dir=str(tmp_path))


def test_reward_weights_of_the_wrong_length(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="reward_weights"):
        make(tiny_model_dir, tmp_path, ["per_device_batch_size=2", "reward_weights=[1.0, 2.0]"])


def test_a_verifiable_reward_rises(tiny_model_dir, tmp_path):
    """Reward 1 when the completion contains the record's target character (about 8% of random
    8-token completions at the start); 15 steps of GRPO make it the common case."""
    tr = make(tiny_model_dir, tmp_path, ["per_device_batch_size=4", "max_steps=15", "learning_rate=3e-3",
                                         "lr_scheduler=constant", "logging_steps=100",
                                         "reward_funcs=[test_grpo_trainer:contains_target]"],
              reward_funcs=[], records=prompts(64))

    def mean_reward():  # 4 samples of 32 prompts, a fixed seed
        examples = [tr.train_data[i] for i in range(32) for _ in range(4)]
        return float(tr.rewards(examples, tr.sample(examples, seed=1234))[0].mean())

    before = mean_reward()
    tr.train()
    after = mean_reward()
    assert before < 0.2 and after > before + 0.3, (before, after)


def test_dapo_updates_of_one_rollout_share_its_normaliser(tiny_model_dir, tmp_path):
    """num_mini_batches = 2: each update divides by the rollout's loss tokens / 2 (TRL's generation-batch
    num_items_in_batch), so at the same parameters the two updates' gradients average to the one
    update over the whole rollout — whatever the two halves' completion lengths."""
    grads = []
    for minis in (2, 1):
        tr = make(tiny_model_dir, tmp_path / f"m{minis}",
                  ["loss_type=dapo", "per_device_batch_size=2", "max_steps=1", "beta=0.1",
                   "gradient_accumulation_steps=2", f"num_mini_batches={minis}", "max_grad_norm=0",
                   "learning_rate=1e-30", "lr_scheduler=constant"])  # the parameters do not move between updates
        updates, _ = record(tr)
        tr.train()
        grads.append([u["grads"] for u in updates])
    (first, second), (whole,) = grads
    assert_grads_close({n: (first[n] + second[n]) / 2 for n in whole}, whole, rtol=1e-5)
