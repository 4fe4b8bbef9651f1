"""The loop of the online stages (PPO, GRPO): sample, score, update on the samples, drop them.

One training step is one rollout. The step's prompts (per process `per_device_batch_size` ×
`gradient_accumulation_steps`, the same window of the seeded per-epoch permutation as the offline
stages) are each sampled `samples_per_prompt()` times; the stage turns the samples into experience
rows (`make_experience`: rewards, old and reference log-probs, advantages, ...); then
`rollout_epochs()` passes over the rows, each pass split into `num_mini_batches` optimizer
updates of `gradient_accumulation_steps / num_mini_batches` micro-batches. The rows are dropped
after the step (on-policy). Sampling is seeded by (seed, step, process): a resumed run samples the
completions the uninterrupted one did.

A stage implements `samples_per_prompt`, `rollout_epochs`, `make_experience`, `count_items`,
`compute_loss`, and builds its collator (a `RolloutCollator` naming its fields).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from alignfast.trainers.base import Trainer
from alignfast.trainers.config import TrainConfig, _check_model_path, opt
from alignfast.trainers.generation import Sampling, sample_completions
from alignfast.trainers.rewards import Rewards, import_function


@dataclass
class OnlineConfig(TrainConfig):
    max_new_tokens: int = opt(32, "most tokens sampled per completion")
    temperature: float = opt(1.0, "sampling temperature; the log-probs are of the same tempered distribution")
    top_k: int = opt(0, "top-k sampling (0: off)")
    top_p: float = opt(1.0, "nucleus sampling (1: off)")
    num_mini_batches: int = opt(1, "optimizer updates per pass over a rollout (divides gradient_accumulation_steps)")
    reward_funcs: list = opt([], "reward functions, as package.module:function (called like TRL's)")
    reward_weights: list | None = opt(None, "weight of each reward source (functions first, then the reward model)")
    reward_model: str | None = opt(None, "reward model directory (a sequence-classification model, 1 label)")
    ref_model: str | None = opt(None, "reference model directory; default: a frozen copy of the initial policy")
    generation_batch_size: int | None = opt(None, "prompts per `generate` call (default: all of the step's)")

    stage = "online"
    data_kind = "prompt"

    def sampling(self) -> Sampling:
        return Sampling(self.max_new_tokens, self.temperature, self.top_k, self.top_p)

    def validate(self):
        super().validate()
        self.sampling().validate()
        if not isinstance(self.num_mini_batches, int) or self.num_mini_batches < 1 or \
                self.gradient_accumulation_steps % self.num_mini_batches:
            raise ValueError(f"num_mini_batches must be >= 1 and divide gradient_accumulation_steps="
                             f"{self.gradient_accumulation_steps}, got {self.num_mini_batches!r}")
        if self.generation_batch_size is not None:
            if self.generation_batch_size < 1:
                raise ValueError(f"generation_batch_size must be >= 1, got {self.generation_batch_size!r}")
        for key in ("reward_model", "ref_model"):
            if getattr(self, key) is not None:
                _check_model_path(key, getattr(self, key))
        if self.reward_weights is not None:
            try:
                self.reward_weights = [float(w) for w in self.reward_weights]
            except (TypeError, ValueError):
                raise ValueError(f"reward_weights must be numbers, got {self.reward_weights!r}") from None
            if not all(math.isfinite(w) for w in self.reward_weights):
                raise ValueError(f"reward_weights must be finite, got {self.reward_weights!r}")
        return self


class OnlineTrainer(Trainer):
    config_class = OnlineConfig
    data_kind = "prompt"

    def __init__(self, config, *, reward_funcs=None, reward_model=None, **kwargs):
        """reward_funcs: callables (beside `config.reward_funcs`); reward_model: a sequence-classification
        model object (instead of `config.reward_model`)."""
        self._reward_args = (reward_funcs, reward_model)
        super().__init__(config, **kwargs)

    def setup(self) -> None:
        self.rewards = self.build_rewards()

    # ---- stage hooks ----------------------------------------------------------------------------
    def samples_per_prompt(self) -> int:
        return 1

    def rollout_epochs(self) -> int:
        return 1

    def make_experience(self, examples: list[dict], completions: list[list[int]]) -> tuple[list[dict], dict]:
        """(rows for the updates, metrics of the rollout: floats, this process's means)."""
        raise NotImplementedError

    def updates_per_step(self) -> int:
        return self.rollout_epochs() * self.cfg.num_mini_batches

    # ---- rewards and sampling -------------------------------------------------------------------
    def build_rewards(self) -> Rewards:
        """The reward sources of the config and of the constructor (functions, then the model)."""
        from alignfast.trainers.reward import load_reward_model

        funcs, model = self._reward_args
        sources = [import_function(s) for s in self.cfg.reward_funcs] + list(funcs or [])
        if model is None and self.cfg.reward_model:
            model = self.cfg.reward_model
        if model is not None:
            model = load_reward_model(self.cfg, model, self.tokenizer.pad_token_id)
            sources.append(model.to(self.accelerator.device))
        return Rewards(sources, self.cfg.reward_weights, self.tokenizer, self.tokenizer.pad_token_id)

    def policy_lm(self):
        """The policy's causal LM (for `generate`), unwrapped from DDP and `HiddenStatesModel`."""
        return self.accelerator.unwrap_model(self.model).causal_lm

    def sample(self, examples: list[dict], seed: int, sampling: Sampling | None = None) -> list[list[int]]:
        return sample_completions(self.policy_lm(), [e["prompt_ids"] for e in examples],
                                  sampling or self.cfg.sampling(), eos_token_id=self.tokenizer.eos_token_id,
                                  pad_token_id=self.tokenizer.pad_token_id, seed=seed,
                                  batch_size=self.cfg.generation_batch_size, prepared=self.model)

    def sampling_seed(self, step: int) -> int:
        return (self.cfg.seed * 1_000_003 + step) * 1_009 + self.accelerator.process_index

    # ---- one step: rollout, then updates --------------------------------------------------------
    def run_step(self, step: int) -> dict:
        cfg, acc = self.cfg, self.accelerator
        examples = [self.train_data[i] for idx in self.step_indices(step) for i in idx]
        examples = [e for e in examples for _ in range(self.samples_per_prompt())]
        completions = self.sample(examples, self.sampling_seed(step))
        rows, rollout_metrics = self.make_experience(examples, completions)
        per_micro = len(rows) // cfg.gradient_accumulation_steps
        micro_per_update = cfg.gradient_accumulation_steps // cfg.num_mini_batches
        updates = []
        for epoch in range(self.rollout_epochs()):
            gen = torch.Generator().manual_seed(self.sampling_seed(step) * 31 + epoch)
            order = torch.randperm(len(rows), generator=gen).tolist()
            batches = [[self.to_device(self.collator([rows[i] for i in order[start:start + per_micro]]))
                        for start in range(u * micro_per_update * per_micro, (u + 1) * micro_per_update * per_micro,
                                           per_micro)]
                       for u in range(cfg.num_mini_batches)]
            if epoch == 0:  # the rollout's items, across processes (GRPO's dapo normalises by them)
                local = sum(self.count_items(b) for micro in batches for b in micro)
                self.rollout_items = self._reduce_sum([torch.tensor(float(local))])[0]
            updates += [self.training_step(micro) for micro in batches]
        out = self.mean_across_processes(rollout_metrics)
        for key in updates[0]:
            if key == "skipped":
                out["skipped"] = any(u.get("skipped") for u in updates)
            else:
                out[key] = updates[-1][key] if key == "lr" else sum(u[key] for u in updates) / len(updates)
        tokens = sum(len(e["prompt_ids"]) + len(c) for e, c in zip(examples, completions)) * acc.num_processes
        return {**out, "tokens": tokens}

    def mean_across_processes(self, metrics: dict) -> dict:
        if not metrics:
            return {}
        names = list(metrics)
        values = self._reduce_sum([torch.tensor(float(metrics[n])) for n in names])
        return {n: v / self.accelerator.num_processes for n, v in zip(names, values.tolist())}

    # ---- evaluation: the mean reward of samples for the held-out prompts ------------------------
    @torch.no_grad()
    def evaluate(self, examples=None) -> dict:
        """Mean reward (and each source's), completion length and EOS rate of one sample per
        held-out prompt (seeded: the same samples for the same weights)."""
        examples = self.eval_data if examples is None else examples
        if not examples:
            return {}
        mine = examples[self.accelerator.process_index::self.accelerator.num_processes]
        # A process without a share samples one prompt weighted 0: the sums' all-reduce (and FSDP's
        # forwards while sampling) need every process. Means over all prompts, each counted once.
        weight, mine = (1.0, mine) if mine else (0.0, examples[:1])
        completions = self.sample(mine, self.sampling_seed(-1))
        total, per_source = self.rewards(mine, completions)
        eos = self.tokenizer.eos_token_id
        sums = {"reward": float(total.sum()), **{f"rewards/{k}": float(v.sum()) for k, v in per_source.items()},
                "completion_length": float(sum(map(len, completions))),
                "eos_fraction": float(sum(bool(c) and c[-1] == eos for c in completions))}
        names = list(sums)
        totals = self._reduce_sum([torch.tensor(weight * sums[n]) for n in names]
                                  + [torch.tensor(weight * len(mine))]).tolist()
        return {n: v / totals[-1] for n, v in zip(names, totals)}
