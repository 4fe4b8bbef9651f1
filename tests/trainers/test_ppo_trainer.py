"""PPOTrainer on the tiny Llama: runs (reward model / function, each KL estimator), the experience and
one update's gradient against independent float64 / plain-PyTorch computations, the adaptive β,
exact resume, gradient-accumulation invariance, config errors, and a seeded improvement check."""
import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from alignfast.trainers.config import load_config
from alignfast.trainers.kl_controller import KLController
from alignfast.trainers.ppo import PPOConfig, PPOTrainer

FAST = ["per_device_batch_size=4", "disable_tqdm=true", "logging_steps=1", "max_length=32", "max_new_tokens=8",
        "num_ppo_epochs=2"]
PROMPTS = [{"prompt": f"{i}+{i + 1}="} for i in range(16)]


def contains_a(prompts, completions, **kw):
    return [float("a" in c) for c in completions]


def make(model_dir, out_dir, overrides=(), records=PROMPTS, **kw):
    cfg = load_config(PPOConfig, None, FAST + list(overrides), model=model_dir, output_dir=str(out_dir))
    return PPOTrainer(cfg, train_dataset=records, **kw)


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tiny_model_dir):
    """A tiny LlamaForSequenceClassification (1 label) with the tiny model's config, other weights."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig.from_pretrained(tiny_model_dir, num_labels=1)
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("rm") / "reward"
    LlamaForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    """Another tiny Llama (other seed): a reference far from the policy, so the KL is not 0."""
    from alignfast.models.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("other") / "model", seed=1)


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    after = module.state_dict()
    return any(not torch.equal(before[k], after[k]) for k in before)


# ---- runs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator,source", [("k1", "model"), ("k3", "function"), ("full", "both")],
                         ids=["k1-reward_model", "k3-reward_function", "full-both"])
def test_runs(tiny_model_dir, reward_model_dir, tmp_path, estimator, source):
    overrides = [f"kl_estimator={estimator}", "max_steps=2", "learning_rate=1e-4", "missing_eos_penalty=1.0"]
    if source in ("model", "both"):
        overrides.append(f"reward_model={reward_model_dir}")
    trainer = make(tiny_model_dir, tmp_path, overrides, reward_funcs=[contains_a] if source != "model" else None)
    pv = trainer.policy_and_value()
    policy0, value0, ref0 = state(pv.policy), state(pv.value), state(trainer.reference.model)
    reward_model = next((s for s in trainer.rewards.sources if isinstance(s, torch.nn.Module)), None)
    reward0 = state(reward_model) if reward_model is not None else None
    # value initialised from the reward model when there is one (as TRL), else from the policy's backbone
    init = state(reward_model.seq_cls.model) if reward_model is not None else state(pv.policy.causal_lm.model)
    assert all(torch.equal(init[k], v) for k, v in state(pv.value.seq_cls.model).items())

    out = trainer.train()
    for key in ("objective/scores", "objective/kl", "objective/entropy", "objective/non_score_reward",
                "objective/rlhf_reward", "policy/entropy_avg", "policy/clipfrac_avg", "policy/approxkl_avg",
                "loss/value_avg", "val/clipfrac_avg", "val/explained_variance", "completion_length",
                "eos_fraction", "kl_coef", "loss", "grad_norm"):
        assert math.isfinite(out[key]), (key, out[key])
    assert out["kl_coef"] == pytest.approx(0.05)
    assert changed(policy0, pv.policy) and changed(value0, pv.value)
    assert not changed(ref0, trainer.reference.model)
    if reward0 is not None:
        assert not changed(reward0, reward_model)

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    saved = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(saved.lm_head.weight, pv.policy.causal_lm.lm_head.weight, rtol=0, atol=0)
    value = AutoModelForSequenceClassification.from_pretrained(os.path.join(tmp_path, "value_model"))
    torch.testing.assert_close(value.score.weight, pv.value.seq_cls.score.weight, rtol=0, atol=0)


# ---- the experience and the update, independently ------------------------------------------------
def reference_experience(trainer, rows, scores, beta, estimator, gamma, lam, whiten_rewards):
    """Float64, row by row without padding, from full logits; loop-based GAE."""
    pv = trainer.policy_and_value()
    lm = copy.deepcopy(pv.policy.causal_lm).double()
    ref = copy.deepcopy(trainer.reference.model.causal_lm).double()
    val = copy.deepcopy(pv.value.seq_cls).double()
    temp = trainer.cfg.temperature
    per_row = []
    with torch.no_grad():
        for row in rows:
            p, c = row["prompt_ids"], row["completion_ids"]
            ids = torch.tensor([p + c])
            pos = torch.arange(len(p) - 1, len(p) - 1 + len(c))
            logp_all = F.log_softmax(lm(ids).logits[0, pos] / temp, -1)
            logq_all = F.log_softmax(ref(ids).logits[0, pos] / temp, -1)
            targets = torch.tensor(c)
            lp, lq = logp_all[torch.arange(len(c)), targets], logq_all[torch.arange(len(c)), targets]
            if estimator == "k1":
                kl = lp - lq
            elif estimator == "k3":
                kl = torch.exp(lq - lp) - (lq - lp) - 1
            else:
                kl = (logp_all.exp() * (logp_all - logq_all)).sum(-1)
            values = val.score(val.model(ids).last_hidden_state)[0, pos, 0]
            per_row.append({"logps": lp, "kl": kl, "values": values})
    rewards = []
    for r, s in zip(per_row, scores.double()):
        rew = -beta * r["kl"]
        rew[-1] += s
        rewards.append(rew)
    if whiten_rewards:
        flat = torch.cat(rewards)
        mean, var = flat.mean(), flat.var(unbiased=True)
        rewards = [(x - mean) / torch.sqrt(var + 1e-8) + mean for x in rewards]
    for r, rew in zip(per_row, rewards):
        n, adv, next_adv = len(rew), torch.zeros(len(rew), dtype=torch.float64), 0.0
        for t in reversed(range(n)):
            next_value = r["values"][t + 1] if t + 1 < n else 0.0
            delta = rew[t] + gamma * next_value - r["values"][t]
            next_adv = delta + gamma * lam * next_adv
            adv[t] = next_adv
        r["advantages"], r["returns"] = adv, adv + r["values"]
    flat = torch.cat([r["advantages"] for r in per_row])
    mean, std = flat.mean(), torch.sqrt(flat.var(unbiased=True) + 1e-8)
    for r in per_row:
        r["whitened"] = (r["advantages"] - mean) / std
    return per_row


@pytest.mark.parametrize("estimator,whiten", [("k1", False), ("k3", True), ("full", False)])
def test_experience_matches_float64(tiny_model_dir, other_model_dir, tmp_path, estimator, whiten):
    trainer = make(tiny_model_dir, tmp_path, [f"kl_estimator={estimator}", "kl_coef=0.1", "gamma=0.9", "lam=0.8",
                                              f"whiten_rewards={whiten}", "missing_eos_penalty=0.5",
                                              "temperature=0.8", f"ref_model={other_model_dir}"],
                   reward_funcs=[contains_a])
    examples = trainer.train_data[:8]
    completions = trainer.sample(examples, seed=7)
    rows, metrics = trainer.make_experience(examples, completions)

    texts = trainer.tokenizer.batch_decode(completions, skip_special_tokens=True)
    eos = trainer.tokenizer.eos_token_id
    scores = torch.tensor([float("a" in t) - 0.5 * (c[-1] != eos) for t, c in zip(texts, completions)])
    want = reference_experience(trainer, rows, scores, 0.1, estimator, 0.9, 0.8, whiten)
    tol = dict(rtol=1e-4, atol=1e-4)
    for row, ref in zip(rows, want):
        torch.testing.assert_close(row["old_logps"].double(), ref["logps"], **tol)
        torch.testing.assert_close(row["old_values"].double(), ref["values"], **tol)
        torch.testing.assert_close(row["returns"].double(), ref["returns"], **tol)
        torch.testing.assert_close(row["advantages"].double(), ref["whitened"], **tol)
    seq_kl = torch.stack([r["kl"].sum() for r in want])
    assert metrics["objective/kl"] == pytest.approx(float(seq_kl.mean()), rel=1e-4, abs=1e-4)
    assert metrics["objective/scores"] == pytest.approx(float(scores.mean()), abs=1e-6)
    assert metrics["objective/rlhf_reward"] == pytest.approx(float((scores - 0.1 * seq_kl).mean()), rel=1e-4,
                                                             abs=1e-4)
    assert metrics["objective/kl"] > 0.1  # the reference differs: the KL term is exercised


def test_update_gradient_matches_plain_pytorch(tiny_model_dir, other_model_dir, tmp_path):
    """One micro-batch's gradient (policy and value) against the loss written out from full logits,
    with perturbed old log-probs/values so that both clips are active."""
    cfg = ["kl_estimator=k3", f"ref_model={other_model_dir}", "temperature=0.9", "entropy_coef=0.01",
           "vf_coef=0.5", "cliprange=0.1", "cliprange_value=0.05"]
    trainer = make(tiny_model_dir, tmp_path, cfg, reward_funcs=[contains_a])
    examples = trainer.train_data[:4]
    rows, _ = trainer.make_experience(examples, trainer.sample(examples, seed=3))
    gen = torch.Generator().manual_seed(0)
    for row in rows:
        row["old_logps"] = row["old_logps"] + 0.2 * torch.randn(row["old_logps"].shape, generator=gen)
        row["old_values"] = row["old_values"] + 0.1 * torch.randn(row["old_values"].shape, generator=gen)
    batch = trainer.collator(rows)
    model = trainer.model
    loss_sum, metrics = trainer.compute_loss(model, batch)
    n = trainer.count_items(batch)
    model.zero_grad()
    (loss_sum / n).backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    pv = trainer.policy_and_value()
    logits = pv.policy.causal_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1] / 0.9
    targets = batch["labels"][:, 1:]
    mask = (targets != -100).float()
    logp_all = F.log_softmax(logits, -1)
    logp = logp_all.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    ratio = torch.exp(logp - batch["old_logps"])
    adv = batch["advantages"]
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.9, 1.1))
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    seq_cls = pv.value.seq_cls
    values = seq_cls.score(seq_cls.model(input_ids=batch["input_ids"],
                                         attention_mask=batch["attention_mask"]).last_hidden_state)[:, :-1, 0]
    v_old, ret = batch["old_values"], batch["returns"]
    v_clip = v_old + (values - v_old).clamp(-0.05, 0.05)
    vf = 0.5 * torch.maximum((values - ret) ** 2, (v_clip - ret) ** 2)
    per_token = pg - 0.01 * entropy + 0.5 * vf
    loss = (per_token * mask).sum() / mask.sum()
    loss.backward()
    assert n == int(mask.sum())
    assert metrics["policy/clipfrac_avg"][0] / n > 0 and metrics["val/clipfrac_avg"][0] / n > 0
    assert float(loss_sum.detach()) / n == pytest.approx(float(loss.detach()), rel=1e-5)
    for k, p in model.named_parameters():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{k}: {m}")


# ---- the adaptive β --------------------------------------------------------------------------------
def test_kl_controller_direction():
    fixed = KLController(0.1)
    assert fixed.update(100.0, 64) == 0.1
    above, below = KLController(0.1, target=1.0, horizon=100), KLController(0.1, target=1.0, horizon=100)
    assert above.update(1.1, 10) == pytest.approx(0.1 * (1 + 0.1 * 10 / 100))  # KL 10% over the target
    assert below.update(0.0, 10) == pytest.approx(0.1 * (1 - 0.2 * 10 / 100))  # error clipped at −0.2
    assert above.update(50.0, 10) == pytest.approx(0.1 * 1.01 * 1.02)  # clipped at +0.2
    assert below.update(float("nan"), 10) == pytest.approx(0.098)  # a non-finite KL leaves β


@pytest.mark.parametrize("target,direction", [(1e-3, 1), (1e3, -1)], ids=["kl_above_target", "kl_below_target"])
def test_adaptive_kl_in_training(tiny_model_dir, other_model_dir, tmp_path, target, direction):
    trainer = make(tiny_model_dir, tmp_path, ["adaptive_kl=true", f"target_kl={target}", "kl_horizon=100",
                                              "max_steps=1", "num_ppo_epochs=1", f"ref_model={other_model_dir}"],
                   reward_funcs=[contains_a])
    out = trainer.train()
    assert out["kl_coef"] == pytest.approx(0.05)  # the β this rollout used
    assert out["objective/kl"] > 0
    assert (trainer.kl_ctl.value - 0.05) * direction == pytest.approx(0.05 * 0.2 * 4 / 100)


# ---- resume, accumulation ------------------------------------------------------------------------
def test_exact_resume(tiny_model_dir, tmp_path):
    """4 steps with a checkpoint at 2 vs a run resumed from it: same policy, value and β."""
    overrides = ["max_steps=4", "save_steps=2", "learning_rate=1e-3", "adaptive_kl=true", "target_kl=0.01",
                 "kl_horizon=20"]
    full = make(tiny_model_dir, tmp_path / "a", overrides, reward_funcs=[contains_a])
    full.train()
    ckpt = tmp_path / "a" / "checkpoint-000002"
    with open(ckpt / "trainer_state.json") as f:
        saved_beta = json.load(f)["kl_coef"]
    assert saved_beta != 0.05
    resumed = make(tiny_model_dir, tmp_path / "b", overrides + [f"resume_from={ckpt}"], reward_funcs=[contains_a])
    resumed.train()
    assert resumed.kl_ctl.value == full.kl_ctl.value != saved_beta
    a, b = full.policy_and_value().state_dict(), resumed.policy_and_value().state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=lambda m: f"{k}: {m}")


def test_gradient_accumulation_invariance(tiny_model_dir, tmp_path):
    """2 micro-batches of 2 vs 4 of 1: the same rollout, the same gradient in every update."""
    grads = {}
    for name, split in (("2x2", ["per_device_batch_size=2", "gradient_accumulation_steps=2"]),
                        ("1x4", ["per_device_batch_size=1", "gradient_accumulation_steps=4"])):
        trainer = make(tiny_model_dir, tmp_path / name, split + ["max_steps=1", "learning_rate=1e-6"],
                       reward_funcs=[contains_a])
        seen, step = [], trainer.optimizer.step

        def record(*a, _seen=seen, _trainer=trainer, _step=step, **k):
            _seen.append(torch.cat([p.grad.flatten() for p in _trainer.model.parameters()]))
            return _step(*a, **k)

        trainer.optimizer.step = record
        trainer.train()
        grads[name] = seen
    assert len(grads["2x2"]) == len(grads["1x4"]) == 2  # num_ppo_epochs updates
    for a, b in zip(grads["2x2"], grads["1x4"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ---- config errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("override,key", [
    ("kl_estimator=k2", "kl_estimator"), ("num_ppo_epochs=0", "num_ppo_epochs"), ("gamma=1.5", "gamma"),
    ("lam=-0.1", "lam"), ("cliprange=-0.1", "cliprange"), ("vf_coef=-1", "vf_coef"), ("target_kl=0", "target_kl"),
    ("kl_horizon=0", "kl_horizon"), ("missing_eos_penalty=-1", "missing_eos_penalty"),
    ("temperature=0", "temperature"), ("value_model=/no/such/dir", "value_model"), ("kl_coef=-1", "kl_coef")])
def test_bad_config(tiny_model_dir, tmp_path, override, key):
    with pytest.raises(ValueError, match=key):
        load_config(PPOConfig, None, FAST + [override], model=tiny_model_dir, output_dir=str(tmp_path))


def test_no_reward_source(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="reward"):
        make(tiny_model_dir, tmp_path)


# ---- it learns -------------------------------------------------------------------------------------
def test_score_improves(tiny_model_dir, tmp_path):
    """Seeded: reward 1 when the completion contains 'a' (~10% of random 8-token samples). The mean
    reward of one sample per held-out prompt (64, seeded sampling) rises by a clear margin."""
    held_out = [{"prompt": f"{i}*{i + 3}="} for i in range(64)]
    cfg = load_config(PPOConfig, None, ["per_device_batch_size=8", "disable_tqdm=true", "logging_steps=100",
                                        "max_length=32", "max_new_tokens=8", "max_steps=16", "learning_rate=1e-3",
                                        "lr_scheduler=constant", "seed=0"],
                      model=tiny_model_dir, output_dir=str(tmp_path))
    trainer = PPOTrainer(cfg, train_dataset=PROMPTS, eval_dataset=held_out, reward_funcs=[contains_a])
    before = trainer.evaluate()["reward"]
    after = trainer.train()["eval_reward"]
    assert after > before + 0.25, (before, after)
