"""Constitutional AI (Bai et al., 2022, "Harmlessness from AI Feedback"): two offline stages.

SL-CAI  for each (red-team) prompt: sample a response from the policy; then `sl_num_revisions`
        rounds of: sample a principle of the constitution, critique the latest response under it,
        revise it. Rows -> output_dir/sl_cai.jsonl; SFT on {prompt, completion: final revision}
        (SFTTrainer) -> output_dir/sl.
RL-CAI  from the SL model, sample two responses per prompt; the feedback model gives
        p_a = P(A better) under a sampled principle (a multiple-choice question). Rows ->
        output_dir/rl_cai.jsonl. Then, by `rl_method`:
        dpo  DPO (DPOTrainer, reference = the SL model) on chosen/rejected -> output_dir/rl: the
             offline equivalent of the paper's RL step.
        ppo  the paper's RLAIF: a preference (reward) model trained on chosen/rejected
             (RewardTrainer, from the SL model) -> output_dir/rl_reward; then PPO (PPOTrainer: value
             head initialised from the reward model, KL to the SL model) on the prompts, scored by
             that reward model -> output_dir/rl (the value model in output_dir/rl/value_model).

The feedback model (alignfast.trainers.feedback): the `feedback=` object (e.g. a CallableFeedback),
else an LMFeedback on `feedback_model`, else on the initial policy (a frozen copy: the same labeller
for both stages, and the SL model never grades itself).

Reuse: output_dir/cai_state.json holds the hash of each finished artefact (sl_data, sl_model,
rl_data, rl_reward_model (rl_method=ppo), rl_model). An artefact whose hash matches the current
config is reused, not regenerated: a rerun after a crash, or `stages: [rl]` after a `stages: [sl]`
run, picks up where it stopped. The hashes chain (sl_data <- generation options, constitution
content, feedback model; sl_model <- sl_data + training options; rl_data <- sl_model + generation
options; rl_reward_model <- rl_data + all but the RL policy's options; rl_model <- all), so changing
rl_beta retrains only the DPO model, and rl_kl_coef only the PPO policy (the reward model is
reused); regenerated data also invalidates what was made from it. A Python feedback model is
identified by its functions' names only: after changing its code, delete output_dir/cai_state.json
(or use a new output_dir).

Generation runs on the main process (the rows are then read back from the jsonl by every process,
so the inner stages train on exactly the saved rows); the SFT, DPO, reward and PPO stages are the
ordinary distributed trainers.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from alignfast.data import load_records, prepare_dataset, write_jsonl
from alignfast.data.constitution import constitution_digest, load_constitution
from alignfast.data.formats import is_conversational
from alignfast.trainers import checkpoint as ckpt
from alignfast.trainers.config import TrainConfig, _check_model_path, opt
from alignfast.trainers.dpo import DPOConfig, DPOTrainer, loss_types
from alignfast.trainers.feedback import (CallableFeedback, LMFeedback, as_feedback, feedback_call,
    revision_win_rate)
from alignfast.trainers.generation import Sampling, sample_completions
from alignfast.trainers.modeling import frozen_copy, load_causal_lm, load_tokenizer
from alignfast.trainers.ppo import PPOConfig, PPOTrainer
from alignfast.trainers.reward import RewardConfig, RewardTrainer
from alignfast.trainers.sft import SFTConfig, SFTTrainer

logger = logging.getLogger(__name__)

STAGE_ORDER = ("sl", "rl")
RL_METHODS = ("dpo", "ppo")
REWARD_STAGE = "rl_reward"  # rl_method=ppo: the reward model's sub-stage (its directory in output_dir)
SL_FILE, RL_FILE, STATE_FILE = "sl_cai.jsonl", "rl_cai.jsonl", "cai_state.json"
SL_STATS_FILE = "sl_cai_stats.json"  # the SL rows' statistics, for the summary of a resumed run
# The rl_ options the reward model depends on (the others are the RL policy's: DPO or PPO).
REWARD_KEYS = ("rl_label_margin", "rl_reward_learning_rate", "rl_reward_max_steps")
# What the sampled rows depend on (beside the constitution's content and the feedback model).
GENERATION_KEYS = ("model", "tokenizer", "dataset", "max_length", "on_bad_record", "dtype", "trust_remote_code",
                   "seed", "backend", "chunk_size", "feedback_model", "feedback_max_length", "max_new_tokens",
                   "temperature", "top_k", "top_p", "generation_batch_size")


@dataclass
class CAIConfig(TrainConfig):
    stages: list = opt(["sl", "rl"], "stages to run (always in the order sl, rl): sl = critique/revision + SFT, "
                                     "rl = AI preference labels + DPO (or reward model + PPO)")
    constitution: str | None = opt(None, "constitution YAML (principles); default: alignfast/data/constitution.yaml")
    feedback_model: str | None = opt(None, "model directory that critiques, revises and compares; default: the "
                                           "initial policy")
    feedback_max_length: int | None = opt(1024, "most tokens of a feedback prompt (the end is kept)")
    max_new_tokens: int = opt(64, "most tokens per sampled response, critique or revision")
    temperature: float = opt(1.0, "sampling temperature (0: greedy)")
    top_k: int = opt(0, "top-k sampling (0: off)")
    top_p: float = opt(1.0, "nucleus sampling (1: off)")
    generation_batch_size: int | None = opt(None, "prompts per `generate` call (default: all)")
    sl_num_revisions: int = opt(1, "critique/revision rounds per response (a new principle each round)")
    sl_learning_rate: float | None = opt(None, "SFT learning rate; default: learning_rate")
    sl_max_steps: int | None = opt(None, "SFT steps; default: max_steps")
    rl_method: str = opt("dpo", "how the AI-labelled pairs are learnt: dpo (DPO on them), or ppo (RLAIF: a "
                                "reward model trained on them, then PPO against it)")
    rl_learning_rate: float = opt(5e-7, "policy learning rate of the RL stage (DPO or PPO)")
    rl_max_steps: int | None = opt(None, "DPO steps or PPO rollouts; default: max_steps")
    rl_beta: float = opt(0.1, "DPO β")
    rl_loss_type: str = opt("sigmoid", "DPO loss type (any of DPOConfig's)")
    rl_label_margin: float = opt(0.0, "keep a pair only when |p_a - 0.5| > this (ties are always dropped)")
    rl_reward_learning_rate: float | None = opt(None, "ppo: reward-model learning rate; default: learning_rate")
    rl_reward_max_steps: int | None = opt(None, "ppo: reward-model steps; default: max_steps")
    rl_kl_coef: float = opt(0.05, "ppo: β of the per-token KL to the SL model in the reward")
    rl_num_ppo_epochs: int = opt(4, "ppo: passes over each rollout")

    stage = "cai"
    data_kind = "prompt"

    def sampling(self) -> Sampling:
        return Sampling(self.max_new_tokens, self.temperature, self.top_k, self.top_p)

    def validate(self):
        super().validate()
        stages = self.stages if isinstance(self.stages, list) else []
        if not stages or len(set(stages)) != len(stages) or any(s not in STAGE_ORDER for s in stages):
            raise ValueError(f"stages must be a non-empty list of distinct stages from {list(STAGE_ORDER)}, "
                             f"got {self.stages!r}")
        load_constitution(self.constitution)  # its errors name `constitution:` and the bad principle/key
        if self.feedback_model is not None:
            _check_model_path("feedback_model", self.feedback_model)
        self.sampling().validate()
        for key in ("feedback_max_length", "generation_batch_size", "sl_learning_rate", "rl_reward_learning_rate"):
            if getattr(self, key) is not None and not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0 (or unset), got {getattr(self, key)!r}")
        if isinstance(self.sl_num_revisions, bool) or not isinstance(self.sl_num_revisions, int) or \
                self.sl_num_revisions < 1:
            raise ValueError(f"sl_num_revisions must be an int >= 1, got {self.sl_num_revisions!r}")
        for key in ("sl_max_steps", "rl_max_steps", "rl_reward_max_steps"):
            value = getattr(self, key)
            if value is not None and (value == 0 or value < -1):
                raise ValueError(f"{key} must be > 0 or -1 (or unset), got {value!r}")
        if self.rl_method not in RL_METHODS:
            raise ValueError(f"rl_method: {self.rl_method!r} is unknown; choose one of {list(RL_METHODS)}")
        for key in ("rl_learning_rate", "rl_beta"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)!r}")
        if self.rl_loss_type not in loss_types("dpo"):
            raise ValueError(f"rl_loss_type: {self.rl_loss_type!r} is unknown; choose one of {list(loss_types('dpo'))}")
        if not 0.0 <= self.rl_label_margin < 0.5:
            raise ValueError(f"rl_label_margin must be in [0, 0.5), got {self.rl_label_margin!r}")
        if not self.rl_kl_coef >= 0:
            raise ValueError(f"rl_kl_coef must be >= 0, got {self.rl_kl_coef!r}")
        if isinstance(self.rl_num_ppo_epochs, bool) or not isinstance(self.rl_num_ppo_epochs, int) or \
                self.rl_num_ppo_epochs < 1:
            raise ValueError(f"rl_num_ppo_epochs must be an int >= 1, got {self.rl_num_ppo_epochs!r}")
        if self.rl_method == "ppo" and "rl" in stages and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 with rl_method=ppo (PPO needs the log-probs of the "
                             f"sampling distribution), got {self.temperature!r}")
        if self.eval_dataset is not None:
            raise ValueError("eval_dataset: cai generates its own SFT/DPO data; hold part of it out with "
                             "eval_fraction instead")
        if self.use_peft:
            raise ValueError("use_peft: not supported by cai yet (the RL stage loads the SL model from disk)")
        if self.resume_from not in (None, "latest"):
            raise ValueError(f"resume_from: cai resumes its stages from output_dir; use 'latest', got "
                             f"{self.resume_from!r}")
        return self

    def stage_config(self, stage: str, model: str, resume: bool = False) \
            -> SFTConfig | RewardConfig | DPOConfig | PPOConfig:
        """The validated config of the inner run of `stage`, in output_dir/<stage>: SFT ("sl"), the
        reward model ("rl_reward", rl_method=ppo), DPO or PPO ("rl", by rl_method; PPO scores with the
        reward model in output_dir/rl_reward). `resume`: from its latest checkpoint, if there is one."""
        common = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)}
        out = os.path.join(self.output_dir, stage)
        # (a stage not resumed starts over: cai has judged its checkpoints stale, so they go)
        common.update(model=model, dataset=None, eval_dataset=None, output_dir=out,
                      run_name=f"{self.run_name}-{stage}" if self.run_name else None,
                      resume_from="latest" if resume and ckpt.checkpoint_dirs(out) else None,
                      overwrite_output_dir=True)
        if stage == "sl":
            common.update(learning_rate=self.sl_learning_rate or self.learning_rate,
                          max_steps=self.sl_max_steps if self.sl_max_steps is not None else self.max_steps)
            return SFTConfig(**common).validate()
        if stage == REWARD_STAGE:
            common.update(learning_rate=self.rl_reward_learning_rate or self.learning_rate,
                          max_steps=self.rl_reward_max_steps if self.rl_reward_max_steps is not None
                          else self.max_steps)
            return RewardConfig(**common).validate()
        common.update(learning_rate=self.rl_learning_rate,
                      max_steps=self.rl_max_steps if self.rl_max_steps is not None else self.max_steps)
        if self.rl_method == "ppo":
            return PPOConfig(**common, reward_model=os.path.join(self.output_dir, REWARD_STAGE),
                             kl_coef=self.rl_kl_coef, num_ppo_epochs=self.rl_num_ppo_epochs,
                             max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                             top_p=self.top_p, generation_batch_size=self.generation_batch_size).validate()
        return DPOConfig(**common, method=self.rl_method, beta=self.rl_beta, loss_type=self.rl_loss_type).validate()


def _digest(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _can_compare(feedback) -> bool:
    if isinstance(feedback, CallableFeedback):
        return feedback.functions["compare"] is not None
    return hasattr(feedback, "compare") or hasattr(feedback, "compare_batch")


def as_completion(prompt, text: str):
    """The completion column for `text`: a string, or an assistant message for a conversational prompt."""
    return [{"role": "assistant", "content": text}] if is_conversational(prompt) else text


class CAITrainer:
    config_class = CAIConfig
    data_kind = "prompt"

    def __init__(self, config: CAIConfig, *, model=None, tokenizer=None, train_dataset=None, feedback=None,
                 accelerator: Accelerator | None = None):
        """model/tokenizer: objects instead of loading `config.model` (the model object is trained in
        place by the SL stage). train_dataset: prompt records or a path, instead of `config.dataset`.
        feedback: a feedback model (see alignfast.trainers.feedback), instead of the LM default."""
        self.cfg = config.validate()
        self.accelerator = accelerator or Accelerator(cpu=self.cfg.cpu)
        self.constitution = load_constitution(self.cfg.constitution)
        self.principles = {p.name: p for p in self.constitution}
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.cfg)
        source = train_dataset if train_dataset is not None else self.cfg.dataset
        if source is None:
            raise ValueError("dataset: no prompts (--dataset or dataset=...)")
        records = load_records(source, self.cfg.dataset_split)
        self.prompts = prepare_dataset(records, "prompt", self.tokenizer, max_length=self.cfg.max_length,
                                       on_bad_record=self.cfg.on_bad_record).examples
        self._model = model
        self._own_feedback = feedback is None  # an LMFeedback this trainer builds (and frees) itself
        self.feedback = as_feedback(feedback) if feedback is not None else None
        # The default labeller is the policy *before* training: copy a given model object now, since
        # the SL stage trains it in place.
        self._feedback_lm = frozen_copy(model) if feedback is None and self.cfg.feedback_model is None \
            and model is not None else None
        if self.feedback is not None:
            self._feedback_id = getattr(self.feedback, "identity", lambda: type(self.feedback).__qualname__)()
        else:
            self._feedback_id = f"lm:{self.cfg.feedback_model or 'initial policy'}"
        # The prompts' content (a dataset given as a list has no path to hash).
        self._prompts_digest = _digest([e["prompt"] for e in self.prompts])
        self.out = self.cfg.output_dir
        os.makedirs(self.out, exist_ok=True)

    # ---- artefacts and their hashes --------------------------------------------------------------
    def _hashes(self, rl_from_sl: bool) -> dict:
        d = {k: v for k, v in self.cfg.identity().items() if k != "stages"}
        gen = {k: d[k] for k in GENERATION_KEYS}
        gen.update(constitution=constitution_digest(self.cfg.constitution), feedback=self._feedback_id,
                   prompts=self._prompts_digest)
        sl_data = _digest({**gen, "sl_num_revisions": d["sl_num_revisions"]})
        sl_model = _digest({"sl_data": sl_data, **{k: v for k, v in d.items() if not k.startswith("rl_")}})
        rl_data = _digest({"policy": sl_model if rl_from_sl else "initial", **gen})
        rl_reward = _digest({"rl_data": rl_data, **{k: v for k, v in d.items()
                                                   if not k.startswith("rl_") or k in REWARD_KEYS}})
        return {"sl_data": sl_data, "sl_model": sl_model, "rl_data": rl_data, "rl_reward_model": rl_reward,
                "rl_model": _digest({"rl_data": rl_data, **d})}

    def _state(self) -> dict:
        path = os.path.join(self.out, STATE_FILE)
        if not os.path.isfile(path):
            return {}
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def _mark(self, key: str, value: str, forget=()) -> None:
        """Records artefact `key` as made with hash `value`; `forget`: artefacts made from its old version."""
        if self.accelerator.is_main_process:
            self._save_json(STATE_FILE, {k: v for k, v in {**self._state(), key: value}.items() if k not in forget})
        self.accelerator.wait_for_everyone()

    def _is_current(self, key: str, hashes: dict, path: str) -> bool:
        return self._state().get(key) == hashes[key] and os.path.exists(path)

    def _model_done(self, stage: str, hashes: dict) -> bool:
        return self._is_current(f"{stage}_model", hashes, os.path.join(self.out, stage, "config.json"))

    def _rows(self, stage: str, hashes: dict, make_rows) -> tuple[list[dict], bool]:
        """(the stage's rows, whether they were reused): read from its jsonl when current, else made on
        the main process, written, and read back by every process."""
        path, key = os.path.join(self.out, SL_FILE if stage == "sl" else RL_FILE), f"{stage}_data"
        if self._is_current(key, hashes, path):
            logger.info("cai: reusing %s (same config hash)", path)
            return load_records(path), True
        failed = None
        if self.accelerator.is_main_process:
            try:
                write_jsonl(make_rows(), path + ".tmp")
                os.replace(path + ".tmp", path)
                self._drop_checkpoints(*((stage, REWARD_STAGE) if stage == "rl" else (stage,)))  # other data
            except Exception as e:
                failed = e
        self._raise_together(failed, f"making the {stage} stage's rows")
        downstream = ("sl_model", "rl_data", "rl_reward_model", "rl_model") if stage == "sl" else \
            ("rl_reward_model", "rl_model")
        self._mark(key, hashes[key], forget=downstream)
        return load_records(path), False

    def _raise_together(self, error: Exception | None, doing: str) -> None:
        """Raises `error` on its process and a pointer to it on the others, which would otherwise wait
        in the next collective for a process that is gone and fail there with a connection error."""
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([float(error is not None)], device=self.accelerator.device)
            if self.accelerator.reduce(flag, reduction="sum").item() == 0:
                return
        if error is not None:
            raise error
        if self.accelerator.num_processes > 1:
            raise RuntimeError(f"cai: the main process failed {doing} (its traceback is in its output)")

    def _path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def _save_json(self, name: str, data: dict) -> None:
        """Written atomically by the main process."""
        if self.accelerator.is_main_process:
            with open(self._path(name) + ".tmp", "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1)
            os.replace(self._path(name) + ".tmp", self._path(name))

    def _sl_stats(self, hashes: dict, rows: list[dict]) -> dict:
        """The SL data's statistics as the run that made `rows` reported them (revision_win_rate needs
        the feedback model, which a resumed run does not load): saved with the rows' hash."""
        path = self._path(SL_STATS_FILE)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            if saved.get("sl_data") == hashes["sl_data"]:
                return saved["stats"]
        return self._sl_row_stats(rows)

    def _sl_row_stats(self, rows: list[dict]) -> dict:
        kept = len(self.sl_records(rows))
        return {"examples": kept, "empty_revisions": len(rows) - kept,
                "revised_fraction": sum(r["revision"] != r["response"] for r in rows) / max(len(rows), 1)}

    def _drop_checkpoints(self, *stages: str) -> None:
        """Deletes the checkpoints of `stages` (main process): they were trained on what is remade."""
        for stage in stages:
            for _, old in ckpt.checkpoint_dirs(os.path.join(self.out, stage)):
                shutil.rmtree(old)

    # ---- sampling and feedback -------------------------------------------------------------------
    def _sample(self, causal_lm, prompt_ids: list[list[int]], seed: int) -> list[str]:
        tok = self.tokenizer
        out = sample_completions(causal_lm.to(self.accelerator.device), prompt_ids, self.cfg.sampling(),
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, seed=seed,
                                 batch_size=self.cfg.generation_batch_size)
        return [tok.decode(ids, skip_special_tokens=True) for ids in out]

    def _get_feedback(self):
        if self.feedback is None:
            cfg = self.cfg
            lm = self._feedback_lm if self._feedback_lm is not None else \
                load_causal_lm(cfg, cfg.feedback_model or cfg.model).eval().requires_grad_(False)
            tok = self.tokenizer if cfg.feedback_model is None else load_tokenizer(
                dataclasses.replace(cfg, model=cfg.feedback_model, tokenizer=None))
            self.feedback = LMFeedback(lm.to(self.accelerator.device), tok, cfg.sampling(), seed=cfg.seed + 1,
                                       max_length=cfg.feedback_max_length, batch_size=cfg.generation_batch_size,
                                       backend=cfg.backend, chunk_size=cfg.chunk_size)
        return self.feedback

    def _release_feedback(self, final: bool) -> None:
        """Frees the LM feedback model before a stage trains (its labels are made): a model loaded from
        disk is reloaded if needed again; the copy of a given model object is kept until `final`."""
        if self._own_feedback:
            self.feedback = None
        if final:
            self._feedback_lm = None

    def _policy(self, path: str | None = None):
        if path is None and self._model is not None:
            return self._model
        if path is None:
            self._model = load_causal_lm(self.cfg)
            return self._model
        return load_causal_lm(self.cfg, path)

    def sl_rows(self, policy) -> list[dict]:
        """SL-CAI data: {prompt, response, principle, critique, revision, rounds} per prompt."""
        fb, cfg = self._get_feedback(), self.cfg
        prompts = [e["prompt"] for e in self.prompts]
        responses = self._sample(policy, [e["prompt_ids"] for e in self.prompts], seed=cfg.seed)
        rng = random.Random(f"cai-sl-{cfg.seed}")
        current, rounds = list(responses), [[] for _ in prompts]
        for _ in range(cfg.sl_num_revisions):
            principles = [rng.choice(self.constitution) for _ in prompts]
            critiques = feedback_call(fb, "critique", list(zip(prompts, current, principles)))
            current = feedback_call(fb, "revise", list(zip(prompts, current, critiques, principles)))
            for i, p in enumerate(principles):
                rounds[i].append({"principle": p.name, "critique": critiques[i], "revision": current[i]})
        return [{"prompt": p, "response": r, "principle": rs[-1]["principle"], "critique": rs[-1]["critique"],
                 "revision": rs[-1]["revision"], "rounds": rs} for p, r, rs in zip(prompts, responses, rounds)]

    def rl_rows(self, policy) -> list[dict]:
        """RL-CAI data: {prompt, response_a, response_b, principle, p_a, chosen, rejected} per prompt."""
        fb, cfg = self._get_feedback(), self.cfg
        samples = self._sample(policy, [e["prompt_ids"] for e in self.prompts for _ in range(2)], seed=cfg.seed + 2)
        rng = random.Random(f"cai-rl-{cfg.seed}")
        items = [(e["prompt"], samples[2 * i], samples[2 * i + 1], rng.choice(self.constitution))
                 for i, e in enumerate(self.prompts)]
        p_a = feedback_call(fb, "compare", items)
        return [{"prompt": prompt, "response_a": a, "response_b": b, "principle": pr.name, "p_a": p,
                 "chosen": a if p >= 0.5 else b, "rejected": b if p >= 0.5 else a}
                for (prompt, a, b, pr), p in zip(items, p_a)]

    # ---- the two stages --------------------------------------------------------------------------
    @staticmethod
    def sl_records(rows: list[dict]) -> list[dict]:
        """SFT records of the SL rows: {prompt, completion: revision}, empty revisions left out."""
        return [{"prompt": r["prompt"], "completion": as_completion(r["prompt"], r["revision"])}
                for r in rows if r["revision"].strip()]

    def rl_records(self, rows: list[dict]) -> list[dict]:
        """DPO records of the RL rows: pairs with a confident label (|p_a − ½| > rl_label_margin) and two
        distinct, non-empty responses."""
        return [{"prompt": r["prompt"], "chosen": as_completion(r["prompt"], r["chosen"]),
                 "rejected": as_completion(r["prompt"], r["rejected"])} for r in rows
                if abs(r["p_a"] - 0.5) > self.cfg.rl_label_margin and r["chosen"] != r["rejected"]
                and r["chosen"].strip() and r["rejected"].strip()]

    def _last_metrics(self, stage: str) -> dict:
        path = os.path.join(self.out, stage, "metrics.jsonl")
        rows = [json.loads(line) for line in open(path, encoding="utf-8")] if os.path.isfile(path) else []
        last = next((r for r in reversed(rows) if r.get("split") == "train"), {})
        return {k: v for k, v in last.items() if k not in ("step", "split")}

    def _train(self, stage: str, trainer_class, cfg, model, records: list[dict], report=None) -> dict:
        """Trains `stage` (its final model saved in cfg.output_dir); `report(trainer)`: more metrics,
        taken from the trained trainer before it is freed."""
        trainer = trainer_class(cfg, model=model, tokenizer=self.tokenizer, train_dataset=records,
                                accelerator=self.accelerator)
        metrics = trainer.train()
        if report is not None:
            metrics.update(report(trainer))
        del trainer
        self.accelerator.free_memory()  # the accelerator keeps the prepared model/optimizer otherwise
        return metrics

    def run_sl(self) -> dict:
        hashes = self._hashes(rl_from_sl=True)
        if self._model_done("sl", hashes):  # the summary of the run that trained it, flagged as reused
            logger.info("cai: reusing the SL model in %s (same config hash)", os.path.join(self.out, "sl"))
            stats = self._sl_stats(hashes, load_records(self._path(SL_FILE)))
            return {"reused": 1.0, **self._last_metrics("sl"), **stats}
        policy = self._policy()
        rows, reused = self._rows("sl", hashes, lambda: self.sl_rows(policy))
        records = self.sl_records(rows)
        if reused:
            stats = self._sl_stats(hashes, rows)
        else:
            stats = self._sl_row_stats(rows)
            if _can_compare(self.feedback):  # (rows made here: the feedback model is loaded)
                stats["revision_win_rate"] = revision_win_rate(
                    self.feedback, [r["prompt"] for r in rows], [r["response"] for r in rows],
                    [r["revision"] for r in rows], [self.principles[r["principle"]] for r in rows])
            self._save_json(SL_STATS_FILE, {"sl_data": hashes["sl_data"], "stats": stats})
        if not records:
            raise ValueError(f"cai: every revision in {SL_FILE} is empty; nothing to fine-tune on")
        self._release_feedback(final="rl" not in self.cfg.stages)
        cfg = self.cfg.stage_config("sl", self.cfg.model, resume=bool(self.cfg.resume_from) and reused)
        metrics = self._train("sl", SFTTrainer, cfg, policy, records)
        self._model = None  # trained and saved in output_dir/sl, which the RL stage loads
        self._mark("sl_model", hashes["sl_model"])
        return {**metrics, **stats}

    def run_reward(self, hashes: dict, start: str, records: list[dict], resume: bool) -> tuple[dict, bool]:
        """rl_method=ppo: the reward (preference) model on the AI-labelled pairs, from `start` (the SL
        model's directory), -> output_dir/rl_reward; reused when current. (metrics, whether it was
        trained now). `pair_accuracy`: how often the trained model ranks chosen over rejected on all its
        training pairs (`accuracy` is the last batch's); `eval_accuracy` (eval_fraction > 0): on the
        held-out pairs."""
        if self._model_done(REWARD_STAGE, hashes):
            logger.info("cai: reusing the reward model in %s (same config hash)",
                        os.path.join(self.out, REWARD_STAGE))
            return {"reused": 1.0, **self._last_metrics(REWARD_STAGE)}, False
        if self.accelerator.is_main_process:  # PPO checkpoints scored by another reward model
            self._drop_checkpoints("rl")
        self.accelerator.wait_for_everyone()
        cfg = self.cfg.stage_config(REWARD_STAGE, start, resume=resume)
        metrics = self._train(REWARD_STAGE, RewardTrainer, cfg, None, records, report=lambda t: {
            "pair_accuracy": t.evaluate(t.train_data)["accuracy"]})
        self._mark("rl_reward_model", hashes["rl_reward_model"])
        return metrics, True

    def run_rl(self) -> dict:
        """The RL stage's metrics; with rl_method=ppo, the reward model's under `reward_model/`."""
        from_sl = "sl" in self.cfg.stages or self._model_done("sl", self._hashes(rl_from_sl=True))
        hashes = self._hashes(rl_from_sl=from_sl)
        ppo = self.cfg.rl_method == "ppo"
        if self._model_done("rl", hashes) and (not ppo or self._model_done(REWARD_STAGE, hashes)):
            logger.info("cai: reusing the RL model in %s (same config hash)", os.path.join(self.out, "rl"))
            reward = {"reward_model/reused": 1.0, **{f"reward_model/{k}": v for k, v in
                                                     self._last_metrics(REWARD_STAGE).items()}} if ppo else {}
            return {"reused": 1.0, **self._last_metrics("rl"), **reward}
        sl_dir = os.path.join(self.out, "sl")
        policy = self._policy(sl_dir if from_sl else None)
        rows, reused = self._rows("rl", hashes, lambda: self.rl_rows(policy))
        self._release_feedback(final=True)
        records = self.rl_records(rows)
        if not records:
            raise ValueError(f"cai: no usable pair in {RL_FILE} (all ties, identical or empty responses, "
                             f"or |p_a - 0.5| <= rl_label_margin={self.cfg.rl_label_margin})")
        stats = {"pairs": len(records), "dropped_pairs": len(rows) - len(records),
                 "p_a_mean": sum(r["p_a"] for r in rows) / len(rows),
                 "label_confidence": sum(max(r["p_a"], 1 - r["p_a"]) for r in rows) / len(rows)}
        start, resume = sl_dir if from_sl else self.cfg.model, bool(self.cfg.resume_from) and reused
        trainer_class = DPOTrainer
        if ppo:
            reward, trained = self.run_reward(hashes, start, records, resume)
            stats.update({f"reward_model/{k}": v for k, v in reward.items()})
            records, resume, trainer_class = [{"prompt": e["prompt"]} for e in self.prompts], \
                resume and not trained, PPOTrainer
        cfg = self.cfg.stage_config("rl", start, resume=resume)
        metrics = self._train("rl", trainer_class, cfg, policy, records)
        self._mark("rl_model", hashes["rl_model"])
        return {**metrics, **stats}

    def train(self) -> dict:
        """Runs the configured stages; metrics prefixed by stage: sl/loss, sl/revision_win_rate,
        rl/rewards/accuracies, rl/eval_rewards/accuracies (with eval_fraction > 0), ...; with
        rl_method=ppo: rl/reward_model/pair_accuracy, rl/objective/scores, rl/objective/kl, ..."""
        out = {}
        for stage in STAGE_ORDER:
            if stage in self.cfg.stages:
                metrics = self.run_sl() if stage == "sl" else self.run_rl()
                out.update({f"{stage}/{k}": v for k, v in metrics.items()})
        return out

    def end_training(self) -> None:
        # every process reaches the end before the group is torn down: a process that exits while
        # another still talks to the rendezvous store can abort it ("terminate called ...")
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
