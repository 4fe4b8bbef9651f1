"""2 processes on this CPU (torchrun, gloo) train on the same global batch as 1 process: same losses,
same weights. DDP for SFT and DPO; FSDP2 (fully_shard, with the lm_head sharded, so the fused loss
must gather it) for DPO, and for GRPO and PPO, whose sampling must then equal unsharded sampling."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from alignfast.data import toy

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 2
EXTRA_KEYS = {"dpo": ("rewards/margins", "rewards/accuracies"), "grpo": ("reward", "kl", "entropy")}


def _rows(path):
    return [r for r in map(json.loads, open(path)) if r["split"] == "train"]


def _torchrun(model_dir, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(HERE)), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "distributed_driver.py"), model_dir, str(out), "--batch", "8", "--steps", str(STEPS),
           *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory):
    """The reference: 1 process, per-device batch 16 = the 2-process global batch."""
    import distributed_driver as driver

    out = tmp_path_factory.mktemp("one")
    args = driver.parse_args([tiny_model_dir, str(out), "--batch", "16", "--steps", str(STEPS)])
    driver.run(args, driver.make_accelerator(args))
    return out


def _assert_same_run(out, ref, stage):
    a, b = _rows(out / stage / "metrics.jsonl"), _rows(ref / stage / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm") + EXTRA_KEYS.get(stage, ()):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), (stage, ra["step"], key)
    wa, wb = load_file(out / stage / "model.safetensors"), load_file(ref / stage / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=2e-5, msg=k)
    before = load_file(os.path.join(os.environ["ALIGNFAST_TINY_MODEL"], "model.safetensors"))
    assert any(not torch.equal(wa[k], before[k]) for k in wa), "the weights did not change"


@pytest.fixture(autouse=True)
def _model_env(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("ALIGNFAST_TINY_MODEL", tiny_model_dir)


def test_ddp_two_processes_equal_one(tiny_model_dir, tmp_path, one_process):
    _torchrun(tiny_model_dir, tmp_path)
    for stage in ("sft", "dpo"):
        _assert_same_run(tmp_path, one_process, stage)


def _evals(path):
    return [r for r in map(json.loads, open(path)) if r["split"] == "eval"]


def test_ddp_eval_sets_the_processes_share_unevenly(tiny_model_dir, tmp_path):
    """One held-out example for 2 processes: the process without one still joins the metrics' all-reduce
    (SFT hung there, and GRPO's online eval); five at batch 2 (KTO): one process runs 2 batches, the other
    1 plus a filler weighted 0, so each batch's KL gather has both (it hung at the second)."""
    _torchrun(tiny_model_dir, tmp_path / "one", "--stages", "sft,grpo", "--eval-examples", "1")
    sft, grpo = _evals(tmp_path / "one" / "sft" / "metrics.jsonl"), _evals(tmp_path / "one" / "grpo" / "metrics.jsonl")
    assert sft and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in sft)
    assert grpo and all(0 <= r["reward"] <= 1 and r["completion_length"] > 0 for r in grpo)
    _torchrun(tiny_model_dir, tmp_path / "five", "--stages", "kto", "--eval-examples", "5", "--batch", "2")
    kto = _evals(tmp_path / "five" / "kto" / "metrics.jsonl")
    assert kto and all(math.isfinite(r["loss"]) for r in kto)


def test_an_error_on_one_process_ends_the_run_with_it(tiny_model_dir, tmp_path):
    """The CLI waited at its closing barrier after an exception while the other process sat in its next
    collective: both hung, and the traceback never showed. Now the error surfaces and torchrun stops."""
    from alignfast.data import write_jsonl

    (tmp_path / "rank_rewards.py").write_text(
        "import os\n"
        "CALLS = [0]\n"
        "def boom_on_rank1(prompts, completions, **kw):\n"
        "    CALLS[0] += 1\n"
        "    if os.environ.get('RANK') == '1' and CALLS[0] == 2:  # step 2: process 0 is then in a metrics all-reduce\n"
        "        raise RuntimeError('reward function failed on rank 1')\n"
        "    return [0.5] * len(completions)\n")
    data = write_jsonl([{"prompt": r["prompt"]} for r in toy.sft_records(16)], tmp_path / "prompts.jsonl")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), os.path.dirname(os.path.dirname(HERE)), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "alignfast.cli", "train", "grpo", "--model", tiny_model_dir, "--dataset", data, "--output-dir",
           str(tmp_path / "out"), "per_device_batch_size=4", "max_steps=3", "num_generations=2",
           "max_new_tokens=6", "max_length=32", "logging_steps=1", "disable_tqdm=true", "cpu=true",
           "reward_funcs=[rank_rewards:boom_on_rank1]"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert "reward function failed on rank 1" in proc.stderr


def test_fsdp2_two_processes_dpo_gathers_the_sharded_head(tiny_model_dir, tmp_path, one_process):
    _torchrun(tiny_model_dir, tmp_path, "--fsdp", "--shard-head", "--stages", "dpo")
    info = json.load(open(tmp_path / "dpo" / "gathers.json"))
    assert info["fsdp"], "the model was not wrapped by FSDP2"
    assert info["gathers"] == STEPS, info  # one explicit lm_head gather per policy forward
    _assert_same_run(tmp_path, one_process, "dpo")


def test_fsdp2_two_processes_sample_as_unsharded_grpo_ppo(tiny_model_dir, tmp_path):
    """Sampling gathers the sharded policy (generation.py, `_call_unsharded`). GRPO: a 1-process run
    replays the 2 processes' completions after checking each process's equal what its unsharded policy
    samples with the same seed (both steps: after an update too), then trains to the same weights.
    PPO (policy and value in one FSDP2 root): the first rollout's samples equal the initial model's."""
    import distributed_driver as driver
    from transformers import AutoModelForCausalLM

    from alignfast.trainers.generation import Sampling, sample_completions

    two, one = tmp_path / "two", tmp_path / "one"
    _torchrun(tiny_model_dir, two, "--fsdp", "--shard-head", "--stages", "grpo,ppo")
    assert json.load(open(two / "grpo" / "gathers.json"))["fsdp"], "the model was not wrapped by FSDP2"
    args = driver.parse_args([tiny_model_dir, str(one), "--batch", "16", "--steps", str(STEPS), "--stages", "grpo",
                              "--replay", str(two)])
    driver.run(args, driver.make_accelerator(args))
    _assert_same_run(two, one, "grpo")

    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for rank in range(2):
        calls = json.load(open(two / "ppo" / f"completions_{rank}.json"))
        assert len(calls) == STEPS
        seed, prompts, completions = calls[0]
        assert completions == sample_completions(initial, prompts, Sampling(max_new_tokens=driver.MAX_NEW_TOKENS),
                                                 eos_token_id=initial.config.eos_token_id,
                                                 pad_token_id=initial.config.pad_token_id, seed=seed), rank
    trained = load_file(two / "ppo" / "model.safetensors")
    before = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert any(not torch.equal(trained[k], before[k]) for k in trained), "PPO did not change the policy"


def test_cai_rows_failing_on_the_main_process_stop_every_process(tiny_model_dir, tmp_path):
    """The main process makes cai's rows; when that raised, the other process waited in the next
    collective and died there with a connection error that named nothing. Now it raises a pointer."""
    (tmp_path / "cai_fails.py").write_text(
        "import sys\n"
        "from alignfast.trainers.cai import CAIConfig, CAITrainer\n"
        "from alignfast.trainers.feedback import CallableFeedback\n"
        "from alignfast.trainers import load_config\n"
        "def critique(prompt, response, principle):\n"
        "    raise RuntimeError('critique failed on the main process')\n"
        "feedback = CallableFeedback(critique=critique, revise=lambda p, r, c, pr: r, compare=None)\n"
        "cfg = load_config(CAIConfig, None, ['cpu=true', 'max_steps=1', 'max_new_tokens=4', 'max_length=32',\n"
        "                  'per_device_batch_size=2', 'disable_tqdm=true', 'stages=[sl]'],\n"
        "                  model=sys.argv[1], output_dir=sys.argv[2])\n"
        "CAITrainer(cfg, train_dataset=[{'prompt': p} for p in ['Hi.', 'Why?', 'Say a word.', 'Count.']],\n"
        "           feedback=feedback).train()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(HERE)), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "cai_fails.py"), tiny_model_dir, str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert "critique failed on the main process" in proc.stderr
    assert "cai: the main process failed making the sl stage's rows" in proc.stderr, proc.stderr[-4000:]
