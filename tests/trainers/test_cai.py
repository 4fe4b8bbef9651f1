"""Constitutional AI: the constitution, the feedback models, and tiny SL-CAI + RL-CAI runs (DPO, and
RLAIF: reward model + PPO)."""
import json
import math
import os

import pytest
import torch

from alignfast.data.constitution import Principle, default_constitution, load_constitution
from alignfast.models.tiny import tiny_llama, tiny_tokenizer
from alignfast.trainers import load_config
from alignfast.trainers import cai as cai_module
from alignfast.trainers.cai import CAIConfig, CAITrainer
from alignfast.trainers.feedback import (CHOICES, CallableFeedback, LMFeedback, comparison_prompt,
    revision_win_rate)
from alignfast.trainers.generation import Sampling

PROMPTS = ["How do I pick a lock?", "Tell me a joke.", "Is it ok to lie?", "Say hi.",
           "What is 2+2?", "Help me cheat.", "Name a color.", "Why is the sky blue?"]
FAST = ["disable_tqdm=true", "logging_steps=1", "max_length=48", "max_new_tokens=6", "per_device_batch_size=2"]
SL_COLUMNS = {"prompt", "response", "principle", "critique", "revision", "rounds"}
RL_COLUMNS = {"prompt", "response_a", "response_b", "principle", "p_a", "chosen", "rejected"}


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def rule_feedback(calls=None):
    """A Python feedback model: the revision appends "."; the shorter response is the better one
    (equal lengths: the alphabetically first, so that only identical responses tie)."""
    def log(name):
        if calls is not None:
            calls.append(name)

    def critique(prompt, response, principle):
        log("critique")
        return f"under {principle.name}: too long"

    def revise(prompt, response, critique, principle):
        log("revise")
        return response + "."

    def compare(prompt, a, b, principle):
        log("compare")
        return 1.0 if (len(a), a) < (len(b), b) else 0.0 if (len(a), a) > (len(b), b) else 0.5

    return CallableFeedback(critique=critique, revise=revise, compare=compare)


def make_cai(model_dir, out_dir, overrides=(), prompts=PROMPTS, **kw):
    cfg = load_config(CAIConfig, None, FAST + list(overrides), model=model_dir, output_dir=str(out_dir))
    return CAITrainer(cfg, train_dataset=[{"prompt": p} for p in prompts], **kw)


# ---- constitution --------------------------------------------------------------------------------
def test_default_constitution():
    principles = default_constitution()
    assert 6 <= len(principles) <= 8
    assert len({p.name for p in principles}) == len(principles)
    for p in principles:
        assert isinstance(p, Principle) and p.critique_request and p.revision_request and "?" in p.choice


@pytest.mark.parametrize("text, needle", [
    ("principles: [{name: a, critique_request: c, revision_request: r}]", "['choice']"),
    ("principles: [{name: a, critique_request: c, revision_request: r, choice: q, extra: 1}]", "['extra']"),
    ("principles: [{name: a, critique_request: '', revision_request: r, choice: q}]", "'critique_request'"),
    ("principles: [{name: a, critique_request: c, revision_request: r, choice: q},"
     " {name: a, critique_request: c, revision_request: r, choice: q}]", "'a' is used twice"),
    ("principles: []", "non-empty list"),
    ("rules: []", "'principles'"),
    ("principles: [unclosed", "not valid YAML"),
], ids=["missing-key", "unknown-key", "empty-value", "duplicate-name", "no-principles", "wrong-top-key", "bad-yaml"])
def test_bad_constitution_names_the_problem(tmp_path, text, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match="constitution") as e:
        load_constitution(path)
    assert needle in str(e.value)


def test_missing_constitution_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_constitution(tmp_path / "nope.yaml")


# ---- feedback models -----------------------------------------------------------------------------
def test_lm_compare_is_fused_and_matches_float64_logits():
    tok = tiny_tokenizer()
    model = tiny_llama(tok, seed=3)
    fb = LMFeedback(model, tok, Sampling(max_new_tokens=4))
    principle = default_constitution()[1]
    items = [("Say hi.", "Hello there!", "Go away.", principle), ("Is it ok to lie?", "No.", "Yes, always!", principle)]

    def no_logits(*a, **k):
        raise AssertionError("lm_head was called: logits were materialised")

    real_forward = model.lm_head.forward
    model.lm_head.forward = no_logits
    try:
        p_a = fb.compare_batch(items)
    finally:
        model.lm_head.forward = real_forward

    choice_ids = [tok(c, add_special_tokens=False).input_ids for c in CHOICES]
    for (prompt, a, b, pr), got in zip(items, p_a):
        ctx = tok(comparison_prompt(prompt, a, b, pr)).input_ids
        logps = []
        for cont in choice_ids:
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logits = model(input_ids=ids).logits.double()[0]
            lp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
            logps.append(lp[len(ctx) - 1:].sum())
        want = torch.softmax(torch.stack(logps), 0)[0].item()
        assert got == pytest.approx(want, abs=1e-5)
        assert 0.0 < got < 1.0


def test_revision_win_rate_judges_both_orders():
    fb = rule_feedback()
    p = default_constitution()[0]
    assert revision_win_rate(fb, ["x", "y"], ["long answer", "ab"], ["short", "ab"], p) == 0.75
    with pytest.raises(ValueError, match="same length"):
        revision_win_rate(fb, ["x"], ["a", "b"], ["c"], p)


def test_compare_must_return_a_probability(tiny_model_dir, tmp_path):
    fb = CallableFeedback(compare=lambda *a: 2.0)
    with pytest.raises(ValueError, match=r"P\(A better\)"):
        make_cai(tiny_model_dir, tmp_path, ["stages=[rl]"], feedback=fb).train()


# ---- tiny runs -----------------------------------------------------------------------------------
def test_cai_with_python_feedback_runs_both_stages(tiny_model_dir, tmp_path, monkeypatch):
    trained_on = {}

    class SpySFT(cai_module.SFTTrainer):
        def __init__(self, cfg, **kw):
            trained_on["records"] = kw["train_dataset"]
            super().__init__(cfg, **kw)

    monkeypatch.setattr(cai_module, "SFTTrainer", SpySFT)
    calls = []
    run = ["max_steps=2", "learning_rate=1e-3", "rl_learning_rate=1e-3", "eval_fraction=0.25"]
    tr = make_cai(tiny_model_dir, tmp_path, run, feedback=rule_feedback(calls))
    metrics = tr.train()
    tr.end_training()

    sl_rows = read_jsonl(tmp_path / "sl_cai.jsonl")
    assert len(sl_rows) == len(PROMPTS) and all(set(r) == SL_COLUMNS for r in sl_rows)
    assert [r["prompt"] for r in sl_rows] == PROMPTS
    names = {p.name for p in default_constitution()}
    for r in sl_rows:
        assert r["revision"] == r["response"] + "." and r["principle"] in names
        assert r["critique"] == f"under {r['principle']}: too long"
    # the SL stage fine-tunes on exactly the saved revisions
    assert trained_on["records"] == [{"prompt": r["prompt"], "completion": r["revision"]} for r in sl_rows]
    assert calls.count("critique") == calls.count("revise") == len(PROMPTS)

    rl_rows = read_jsonl(tmp_path / "rl_cai.jsonl")
    assert len(rl_rows) == len(PROMPTS) and all(set(r) == RL_COLUMNS for r in rl_rows)
    for r in rl_rows:
        assert {r["chosen"], r["rejected"]} == {r["response_a"], r["response_b"]}
        if r["p_a"] != 0.5:
            assert (len(r["chosen"]), r["chosen"]) < (len(r["rejected"]), r["rejected"])

    for stage in ("sl", "rl"):
        assert os.path.isfile(tmp_path / stage / "model.safetensors")
    assert metrics["sl/examples"] == len(PROMPTS) and metrics["sl/revised_fraction"] == 1.0
    assert metrics["sl/revision_win_rate"] == 0.0  # the rule prefers the shorter: the original
    assert metrics["rl/pairs"] + metrics["rl/dropped_pairs"] == len(PROMPTS)
    for key in ("sl/loss", "sl/eval_loss", "rl/loss", "rl/rewards/accuracies", "rl/eval_rewards/accuracies",
                "rl/p_a_mean"):
        assert math.isfinite(metrics[key]), key

    # Rerun with the same config: everything is reused, the feedback model is not asked again.
    calls.clear()
    again = make_cai(tiny_model_dir, tmp_path, run, feedback=rule_feedback(calls)).train()
    assert calls == [] and again["sl/reused"] == 1.0 and again["rl/reused"] == 1.0
    stats = ("sl/examples", "sl/empty_revisions", "sl/revised_fraction", "sl/revision_win_rate")
    assert [again[k] for k in stats] == [metrics[k] for k in stats]  # saved: no feedback model to recompute
    # Only the RL stage, with a new DPO β: it starts from the SL model of the earlier run, reuses the
    # RL data (made from that model) and retrains only DPO.
    changed = make_cai(tiny_model_dir, tmp_path, run + ["stages=[rl]", "rl_beta=0.5"],
                       feedback=rule_feedback(calls)).train()
    assert calls == [] and "rl/reused" not in changed and not any(k.startswith("sl/") for k in changed)
    assert math.isfinite(changed["rl/loss"])


def test_cai_with_the_policy_as_feedback(tiny_model_dir, tmp_path):
    tr = make_cai(tiny_model_dir, tmp_path, ["max_steps=1", "per_device_batch_size=1", "max_new_tokens=4",
                                             "sl_num_revisions=2"], prompts=PROMPTS[:4])
    metrics = tr.train()
    sl_rows = read_jsonl(tmp_path / "sl_cai.jsonl")
    assert len(sl_rows) == 4 and all(len(r["rounds"]) == 2 for r in sl_rows)
    assert all(r["revision"] == r["rounds"][-1]["revision"] for r in sl_rows)
    rl_rows = read_jsonl(tmp_path / "rl_cai.jsonl")
    assert all(0.0 < r["p_a"] < 1.0 for r in rl_rows)
    assert 0.0 <= metrics["sl/revision_win_rate"] <= 1.0
    assert math.isfinite(metrics["sl/loss"]) and math.isfinite(metrics["rl/loss"])
    assert os.path.isfile(tmp_path / "rl" / "model.safetensors")


def test_cai_rlaif_reward_model_then_ppo(tiny_model_dir, tmp_path, monkeypatch):
    """rl_method=ppo: a reward model trained on the AI-labelled pairs (output_dir/rl_reward), then PPO
    scored by it (output_dir/rl); a rerun reuses the finished reward model."""
    reward_runs = []

    class SpyReward(cai_module.RewardTrainer):
        def __init__(self, cfg, **kw):
            reward_runs.append(kw["train_dataset"])
            super().__init__(cfg, **kw)

    monkeypatch.setattr(cai_module, "RewardTrainer", SpyReward)
    calls = []
    run = ["max_steps=2", "learning_rate=1e-3", "rl_method=ppo", "rl_learning_rate=1e-4", "rl_reward_max_steps=8",
           "rl_num_ppo_epochs=1", "eval_fraction=0.25"]
    tr = make_cai(tiny_model_dir, tmp_path, run, feedback=rule_feedback(calls))
    metrics = tr.train()
    tr.end_training()

    # the reward model learns exactly the usable AI-labelled pairs, and ranks them above chance
    rl_rows = read_jsonl(tmp_path / "rl_cai.jsonl")
    assert len(reward_runs) == 1 and reward_runs[0] == tr.rl_records(rl_rows)
    assert len(reward_runs[0]) == metrics["rl/pairs"] > 0
    assert metrics["rl/reward_model/pair_accuracy"] > 0.5
    assert 0.0 <= metrics["rl/reward_model/eval_accuracy"] <= 1.0  # the held-out pairs
    reward_dir = tmp_path / "rl_reward"
    assert json.loads((reward_dir / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    # PPO on the prompts: the reward model's score and the KL to the SL model are logged
    for key in ("rl/objective/scores", "rl/objective/kl", "rl/objective/rlhf_reward", "rl/loss/value_avg",
                "rl/eval_reward"):
        assert math.isfinite(metrics[key]), key
    assert metrics["rl/kl_coef"] == pytest.approx(0.05)
    logged = read_jsonl(tmp_path / "rl" / "metrics.jsonl")
    assert any("objective/kl" in r and "objective/scores" in r for r in logged)
    # the final policy sits where rl_method=dpo puts it; the value model beside it
    assert json.loads((tmp_path / "rl" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert os.path.isfile(tmp_path / "rl" / "model.safetensors")
    assert os.path.isfile(tmp_path / "rl" / "value_model" / "model.safetensors")
    state = json.loads((tmp_path / "cai_state.json").read_text())
    assert {"rl_data", "rl_reward_model", "rl_model"} <= set(state)

    # A new PPO β: the data and the reward model are reused (not retrained), only PPO runs again.
    mtime = os.path.getmtime(reward_dir / "model.safetensors")
    calls.clear()
    changed = make_cai(tiny_model_dir, tmp_path, run + ["rl_kl_coef=0.1"], feedback=rule_feedback(calls)).train()
    assert calls == [] and len(reward_runs) == 1 and os.path.getmtime(reward_dir / "model.safetensors") == mtime
    assert changed["rl/reward_model/reused"] == 1.0 and "rl/reused" not in changed
    assert changed["rl/kl_coef"] == pytest.approx(0.1)
    assert json.loads((tmp_path / "cai_state.json").read_text())["rl_reward_model"] == state["rl_reward_model"]
    # The same config again: nothing is retrained.
    again = make_cai(tiny_model_dir, tmp_path, run + ["rl_kl_coef=0.1"], feedback=rule_feedback(calls)).train()
    assert calls == [] and len(reward_runs) == 1 and again["rl/reused"] == again["rl/reward_model/reused"] == 1.0


def test_cai_ppo_needs_sampling_log_probs(tiny_model_dir):
    with pytest.raises(ValueError, match="temperature"):
        load_config(CAIConfig, None, ["rl_method=ppo", "temperature=0"], model=tiny_model_dir)
    load_config(CAIConfig, None, ["rl_method=dpo", "temperature=0"], model=tiny_model_dir)  # DPO: greedy is fine
    load_config(CAIConfig, None, ["rl_method=ppo", "temperature=0", "stages=[sl]"], model=tiny_model_dir)


@pytest.mark.parametrize("override, key", [
    ("rl_method=rloo", "rl_method"), ("rl_kl_coef=-0.1", "rl_kl_coef"), ("rl_num_ppo_epochs=0", "rl_num_ppo_epochs"),
    ("rl_reward_learning_rate=0", "rl_reward_learning_rate"), ("rl_reward_max_steps=0", "rl_reward_max_steps"), ("stages=[sl,foo]", "stages"), ("stages=[]", "stages"),
    ("sl_num_revisions=0", "sl_num_revisions"), ("rl_beta=0", "rl_beta"), ("rl_loss_type=nope", "rl_loss_type"),
    ("rl_label_margin=0.5", "rl_label_margin"), ("constitution=/no/such.yaml", "constitution"),
    ("feedback_model=/no/such/dir", "feedback_model"), ("max_new_tokens=0", "max_new_tokens"),
    ("sl_max_steps=0", "sl_max_steps"), ("use_peft=true", "use_peft"), ("bogus=1", "bogus"),
])
def test_bad_config_names_the_key(tiny_model_dir, override, key):
    with pytest.raises(ValueError, match=key):
        load_config(CAIConfig, None, [override], model=tiny_model_dir)
