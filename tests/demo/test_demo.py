"""The shortened demo end to end (seeded): every stage moves its held-out metric the right way by a
margin, and the report (demo.md, the PNG plots) is written."""
import os

import pytest

from alignfast.demo import run_demo, task
from alignfast.demo.constitution import PRINCIPLES, RuleFeedback


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return run_demo(str(out), quick=True, seed=0, log=lambda *a: None, threads=1)  # (before the one_thread fixture)


def test_sft_learns_the_task(demo):
    row = demo.row("SFT", "task accuracy (greedy)")
    assert row.before < 0.05 and row.after >= row.before + 0.5, row


def test_reward_model_ranks_held_out_pairs(demo):
    row = demo.row("RM", "preference accuracy")
    assert row.before == 0.5 and row.after > 0.7, row  # zero score head: all ties before


@pytest.mark.parametrize("stage", ["DPO", "KTO"])
def test_implicit_reward_ranks_held_out_pairs(demo, stage):
    row = demo.row(stage, "implicit-reward accuracy")
    assert row.before == 0.5 and row.after > 0.75, row  # the SFT model against itself: all ties before


@pytest.mark.parametrize("stage", ["PPO", "GRPO"])
def test_online_stages_raise_the_reward_within_a_kl_budget(demo, stage):
    reward, kl = demo.row(stage, "mean task reward (sampled)"), demo.row(stage, "KL to SFT (nats/completion)")
    assert reward.after >= reward.before + 0.15, reward
    assert kl.before == pytest.approx(0.0, abs=1e-4) and 0.0 < kl.after < 10.0, kl


def test_ppo_raises_the_reward_model_score(demo):
    row = demo.row("PPO", "reward-model score (sampled)")
    assert row.after > row.before + 1.0, row


def test_cai_wins_against_sft(demo):
    row = demo.row("CAI", "win rate vs SFT (constitution judge)")
    assert row.before == 0.5 and row.after > 0.7, row


def test_report_is_written(demo):
    text = open(os.path.join(demo.output_dir, "demo.md"), encoding="utf-8").read()
    for r in demo.rows:
        assert f"| {r.stage} | {r.metric} |" in text
    for name in ["training_curves.png", "curves_sft.png", "curves_reward.png", "curves_dpo.png", "curves_kto.png",
                 "curves_ppo.png", "curves_grpo.png", "curves_cai_sl.png", "curves_cai_rl.png"]:
        path = os.path.join(demo.output_dir, name)
        assert os.path.getsize(path) > 1000 and name in text, name


# ---- the task and the feedback model, without training ------------------------------------------
def test_task_reward_and_parsing():
    assert task.Problem("abcd").prompt == "reverse abcd:" and task.Problem("abcd").answer == "dcba"
    assert task.task_reward(["reverse abc:"] * 5, ["It is cba.", "cba!!", "cba", "It is cab.", "It is It is cba."],
                            answer=["cba"] * 5) == [1.0, 0.5, 0.5, 0.0, 0.0]
    train, held_out = task.split_problems(500, 50, seed=3)
    assert not {p.word for p in train} & {p.word for p in held_out} and len(train) == 500
    for r in task.preference_records(train, seed=0):
        assert r["chosen"] == task.good_response(r["prompt"][8:-1][::-1]) and r["rejected"] != r["chosen"]
    labels = [r["label"] for r in task.unpaired_records(train)]
    assert 0.35 < sum(labels) / len(labels) < 0.65


@pytest.mark.parametrize("response, revised", [
    ("cba!!", {"full_sentence": "It is cba.", "no_exclamation": "cba", "correct": "cba!!"}),
    ("It is cab.", {"full_sentence": "It is cab.", "no_exclamation": "It is cab.", "correct": "It is cba."}),
    ("zz?", {"full_sentence": "zz?", "no_exclamation": "zz?", "correct": "It is cba."}),
], ids=["curt", "wrong", "garbage"])
def test_rule_feedback_revises_one_principle_at_a_time(response, revised):
    fb = RuleFeedback()
    for p in PRINCIPLES:
        critique = fb.critique("reverse abc:", response, p)
        assert fb.revise("reverse abc:", response, critique, p) == revised[p.name], p.name
        assert fb.compare("reverse abc:", "It is cba.", response, p) in (0.5, 1.0)
        assert fb.compare("reverse abc:", response, response, p) == 0.5
