"""The demo pipeline: a tiny Llama built from code, SFT on the reversal task, then from the SFT model
a reward model -> PPO, and DPO, KTO, GRPO and Constitutional AI, each measured on held-out data
before and after (alignfast.demo.evaluate), each stage's run in its own directory of the demo's:

    <output_dir>/base  sft  reward  dpo  kto  ppo  grpo  cai   models, checkpoints, metrics.jsonl
    <output_dir>/demo.md, *.png                                the report (alignfast.demo.report)

Every stage's configuration is built here in code (`stage_options`); `quick=True` runs a shortened
demo (less data, fewer steps) for the tests. The stages run on the CPU even where a GPU is present
(`cpu=True`): the models are tiny, and the numbers are the same on every machine for a seed.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass, field

import torch

from alignfast.demo import constitution, evaluate, task
from alignfast.models.tiny import tiny_llama, tiny_tokenizer
from alignfast.trainers import STAGES, CAITrainer, DPOTrainer, KTOTrainer, RewardTrainer, SFTTrainer
from alignfast.trainers.config import make_config

STAGE_DIRS = ("base", "sft", "reward", "dpo", "kto", "ppo", "grpo", "cai")


@dataclass(frozen=True)
class Sizes:
    """How much data and how many steps; the full demo and the shortened (`quick`) one."""

    n_train: int = 4000  # training problems (each data kind draws its records from them)
    n_eval: int = 400  # held-out problems (never in any training set)
    sft_steps: int = 500
    reward_steps: int = 120
    dpo_steps: int = 60
    kto_steps: int = 60
    ppo_steps: int = 60
    grpo_steps: int = 60
    cai_prompts: int = 1024
    cai_sl_steps: int = 40
    cai_rl_steps: int = 20
    online_eval_samples: int = 2  # samples per held-out prompt for the PPO/GRPO mean reward and KL


FULL = Sizes()
# PPO keeps its 60 steps: at 40 its held-out task-reward gain ranged 0.13-0.33 over seeds and float
# rounding (the tests ask for 0.15), at 60 0.23-0.35
QUICK = Sizes(n_train=2000, n_eval=128, reward_steps=60, dpo_steps=30, kto_steps=30, ppo_steps=60, grpo_steps=40,
              cai_prompts=256, cai_sl_steps=20, cai_rl_steps=8)

HIDDEN_SIZE, NUM_LAYERS = 64, 2  # the tiny Llama (alignfast.models.tiny)
MAX_NEW_TOKENS = 16  # "It is abcdef." plus EOS is 14 tokens
MAX_LENGTH = 32


def stage_options(stage: str, sizes: Sizes, seed: int) -> dict:
    """The options of one stage (config keys -> values), besides model, data and output_dir."""
    common = {"seed": seed, "cpu": True, "max_length": MAX_LENGTH, "logging_steps": 1,
              "save_total_limit": 1, "lr_scheduler": "cosine", "warmup_steps": 5}
    online = {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0}
    return {
        "sft": {**common, "max_steps": sizes.sft_steps, "learning_rate": 3e-3, "per_device_batch_size": 32,
                "warmup_steps": 10},
        "reward": {**common, "max_steps": sizes.reward_steps, "learning_rate": 1e-3, "per_device_batch_size": 32},
        "dpo": {**common, "max_steps": sizes.dpo_steps, "learning_rate": 5e-4, "per_device_batch_size": 32,
                "beta": 0.5},
        "kto": {**common, "max_steps": sizes.kto_steps, "learning_rate": 5e-4, "per_device_batch_size": 32,
                "beta": 0.5},
        "ppo": {**common, **online, "max_steps": sizes.ppo_steps, "learning_rate": 3e-4, "per_device_batch_size": 32,
                "num_ppo_epochs": 2, "kl_coef": 0.05, "lr_scheduler": "constant"},
        "grpo": {**common, **online, "max_steps": sizes.grpo_steps, "learning_rate": 3e-4, "per_device_batch_size": 8,
                 "num_generations": 8, "beta": 0.0, "lr_scheduler": "constant"},
        "cai": {**common, "max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0, "per_device_batch_size": 32,
                "sl_num_revisions": 2, "learning_rate": 1e-3, "sl_max_steps": sizes.cai_sl_steps,
                "rl_learning_rate": 2e-4, "rl_max_steps": sizes.cai_rl_steps, "rl_beta": 0.1},
    }[stage]


@dataclass
class Row:
    """One line of the results table: a held-out metric of a stage, before and after it."""

    stage: str
    metric: str
    before: float
    after: float

    @property
    def change(self) -> float:
        return self.after - self.before


@dataclass
class DemoResult:
    output_dir: str
    quick: bool
    seed: int
    held_out: int  # held-out problems
    train: int  # training problems (every stage's records are drawn from them)
    model: str = ""  # what the base model is
    rows: list[Row] = field(default_factory=list)
    policies: dict = field(default_factory=dict)  # model name -> {"accuracy", "well_formed", "responses"}
    examples: list[str] = field(default_factory=list)  # the held-out prompts the report shows answers for
    seconds: dict = field(default_factory=dict)  # stage -> wall time
    settings: dict = field(default_factory=dict)  # stage -> options

    def row(self, stage: str, metric: str) -> Row:
        return next(r for r in self.rows if r.stage == stage and r.metric == metric)


class Pipeline:
    def __init__(self, output_dir: str, *, quick: bool = False, seed: int = 0, log=print):
        self.out, self.quick, self.seed, self.log = output_dir, quick, seed, log
        self.sizes = QUICK if quick else FULL
        self.tokenizer = tiny_tokenizer()
        train, held_out = task.split_problems(self.sizes.n_train, self.sizes.n_eval, seed=seed)
        self.train_problems, self.held_out = train, held_out
        self.eval_prompts = task.prompt_records(held_out)
        self.eval_pairs = task.preference_records(held_out, seed=seed + 1)
        self.result = DemoResult(output_dir, quick, seed, len(held_out), len(train),
                                 examples=[p.prompt for p in held_out[:6]])

    # ---- helpers ---------------------------------------------------------------------------------
    def path(self, *parts) -> str:
        return os.path.join(self.out, *parts)

    def config(self, stage: str, model: str, **extra):
        options = {**stage_options(stage, self.sizes, self.seed), **extra}
        self.result.settings[stage] = dict(options)
        return make_config(STAGES[stage][0], {**options, "model": model, "output_dir": self.path(stage),
                                              "overwrite_output_dir": True})  # a rerun starts over

    def load_lm(self, path: str):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval()

    def record_policy(self, name: str, causal_lm) -> dict:
        metrics = evaluate.task_accuracy(causal_lm, self.tokenizer, self.eval_prompts, max_new_tokens=MAX_NEW_TOKENS)
        self.result.policies[name] = metrics
        return metrics

    def add(self, stage: str, metric: str, before: float, after: float) -> None:
        self.result.rows.append(Row(stage, metric, before, after))
        self.log(f"  {stage:<6} {metric:<38} {before:8.3f} -> {after:8.3f}")

    def train(self, trainer) -> dict:
        try:
            return trainer.train()
        finally:
            trainer.end_training()

    # ---- stages ----------------------------------------------------------------------------------
    def base(self) -> str:
        path = self.path("base")
        model = tiny_llama(self.tokenizer, hidden_size=HIDDEN_SIZE, num_layers=NUM_LAYERS, seed=self.seed)
        self.result.model = (f"a Llama (hidden {HIDDEN_SIZE}, {NUM_LAYERS} layers, "
                             f"{sum(p.numel() for p in model.parameters()) / 1e3:.0f}k parameters)")
        model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        return path

    def sft(self, base: str) -> str:
        before = self.record_policy("base (random init)", self.load_lm(base))
        records = task.sft_records(self.train_problems, seed=self.seed)
        self.train(SFTTrainer(self.config("sft", base), tokenizer=self.tokenizer, train_dataset=records))
        after = self.record_policy("SFT", self.load_lm(self.path("sft")))
        self.add("SFT", "task accuracy (greedy)", before["accuracy"], after["accuracy"])
        return self.path("sft")

    def reward(self, sft: str) -> str:
        trainer = RewardTrainer(self.config("reward", sft), tokenizer=self.tokenizer,
                                train_dataset=task.preference_records(self.train_problems, seed=self.seed))
        model = trainer.accelerator.unwrap_model(trainer.model)
        with torch.no_grad():  # an all-zero score head: every pair ties before training (a random one is
            model.score_head().weight.zero_()  # arbitrarily right or wrong on the SFT features)
        before = evaluate.reward_accuracy(model, self.tokenizer, self.eval_pairs)
        self.train(trainer)
        after = evaluate.reward_accuracy(model, self.tokenizer, self.eval_pairs)
        self.add("RM", "preference accuracy", before, after)
        return self.path("reward")

    def preference(self, stage: str, sft: str) -> None:
        """DPO or KTO from the SFT model; implicit-reward accuracy on held-out pairs."""
        if stage == "dpo":
            trainer_class, records = DPOTrainer, task.preference_records(self.train_problems, seed=self.seed)
        else:
            trainer_class, records = KTOTrainer, task.unpaired_records(self.train_problems, seed=self.seed)
        cfg = self.config(stage, sft)
        reference = self.load_lm(sft)
        before = evaluate.implicit_accuracy(reference, reference, self.tokenizer, self.eval_pairs, cfg.beta)
        self.train(trainer_class(cfg, tokenizer=self.tokenizer, train_dataset=records))
        policy = self.load_lm(self.path(stage))
        after = evaluate.implicit_accuracy(policy, reference, self.tokenizer, self.eval_pairs, cfg.beta)
        self.record_policy(stage.upper(), policy)
        self.add(stage.upper(), "implicit-reward accuracy", before["accuracy"], after["accuracy"])

    def online(self, stage: str, sft: str, reward_model: str | None, before: dict) -> dict:
        """PPO (reward model + task reward) or GRPO (task reward) from the SFT model; the mean task reward
        and the KL to the SFT model of samples for held-out prompts."""
        trainer_class = STAGES[stage][1]
        extra = {"reward_model": reward_model} if stage == "ppo" else {}
        trainer = trainer_class(self.config(stage, sft, **extra), tokenizer=self.tokenizer,
                                train_dataset=task.prompt_records(self.train_problems),
                                reward_funcs=[task.task_reward])
        self.train(trainer)
        policy = self.load_lm(self.path(stage))
        after = self.online_eval(policy, sft, reward_model)
        self.record_policy(stage.upper(), policy)
        name = stage.upper()
        self.add(name, "mean task reward (sampled)", before["reward"], after["reward"])
        if "rm_score" in after:
            self.add(name, "reward-model score (sampled)", before["rm_score"], after["rm_score"])
        self.add(name, "KL to SFT (nats/completion)", before["kl"], after["kl"])
        return after

    def online_eval(self, policy, sft: str, reward_model: str | None) -> dict:
        rm = None
        if reward_model is not None:
            from transformers import AutoModelForSequenceClassification

            from alignfast.trainers.reward import ScalarHeadModel

            rm = ScalarHeadModel(AutoModelForSequenceClassification.from_pretrained(
                reward_model, num_labels=1, use_safetensors=True)).eval()
        return evaluate.online_metrics(policy, self.load_lm(sft), self.tokenizer, self.eval_prompts,
                                       task.task_reward, max_new_tokens=MAX_NEW_TOKENS,
                                       samples=self.sizes.online_eval_samples, seed=self.seed + 7, reward_model=rm)

    def cai(self, sft: str) -> None:
        feedback = constitution.RuleFeedback()
        path = constitution.write_constitution(self.path("cai", "constitution.yaml"))
        prompts = [{"prompt": p.prompt} for p in self.train_problems[:self.sizes.cai_prompts]]
        trainer = CAITrainer(self.config("cai", sft, constitution=path), tokenizer=self.tokenizer,
                             train_dataset=prompts, feedback=feedback)
        self.train(trainer)
        prompts = [r["prompt"] for r in self.eval_prompts]
        sft_texts = self.result.policies["SFT"]["responses"]
        before = evaluate.win_rate(feedback, constitution.PRINCIPLES, prompts, sft_texts, sft_texts)
        after_model = self.record_policy("CAI", self.load_lm(self.path("cai", "rl")))
        after = evaluate.win_rate(feedback, constitution.PRINCIPLES, prompts, sft_texts, after_model["responses"])
        self.add("CAI", "win rate vs SFT (constitution judge)", before, after)

    # ---- all of it -------------------------------------------------------------------------------
    def run(self) -> DemoResult:
        os.makedirs(self.out, exist_ok=True)
        timed = self.timed
        base = timed("base", self.base)
        sft = timed("sft", self.sft, base)
        reward_model = timed("reward", self.reward, sft)
        timed("dpo", self.preference, "dpo", sft)
        timed("kto", self.preference, "kto", sft)
        before = timed("online eval", self.online_eval, self.load_lm(sft), sft, reward_model)
        timed("ppo", self.online, "ppo", sft, reward_model, before)
        timed("grpo", self.online, "grpo", sft, None, {k: v for k, v in before.items() if k != "rm_score"})
        timed("cai", self.cai, sft)
        return self.result

    def timed(self, name: str, fn, *args):
        self.log(f"[demo] {name} ...")
        t0 = time.perf_counter()
        out = fn(*args)
        self.result.seconds[name] = time.perf_counter() - t0
        self.log(f"[demo] {name} done in {self.result.seconds[name]:.1f} s")
        return out


def run_demo(output_dir: str = "outputs/demo", *, quick: bool = False, seed: int = 0, log=print,
             threads: int | None = None) -> DemoResult:
    """Runs the whole pipeline, writes demo.md and the plots to `output_dir`, returns the results.
    `threads`: torch threads for the run (default: as set; tiny models are fastest on one or two)."""
    from alignfast.demo.report import write_report

    if os.path.isdir(output_dir):
        for stage in STAGE_DIRS:  # a previous demo's runs: start afresh (CAI reuses its own artefacts)
            shutil.rmtree(os.path.join(output_dir, stage), ignore_errors=True)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with quiet_transformers():
            result = Pipeline(output_dir, quick=quick, seed=seed, log=log).run()
        write_report(result)
    finally:
        torch.set_num_threads(previous)
    return result


@contextlib.contextmanager
def quiet_transformers():
    """No load reports (the reward model's fresh score head is expected) or weight-loading bars."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
