"""The training loop every stage shares, on `accelerate.Accelerator`.

A stage subclasses `Trainer` and supplies only what is specific to it:

    data_kind                       "sft" | "preference" | "unpaired" (the dataset's columns)
    build_collator()                examples -> padded tensors
    count_items(batch)              what the loss is averaged over (tokens, pairs, examples)
    compute_loss(model, batch)      -> (sum of the loss over the batch's items, {metric: sum | (sum, count)})
    build_model(model)              default: the causal LM behind a backbone-only `HiddenStatesModel`

Loss normalisation (as TRL's `num_items_in_batch`): the micro-batches of one optimizer step are
collated first, their items counted and summed across processes (N), and each micro-batch's
backward is run on `loss_sum · world_size / N` (DDP averages gradients over processes). The step's
gradient is then the gradient of the mean over all N items of the global batch, whatever the split
into micro-batches and processes.

Data order: step s takes the s-th slice of a per-epoch permutation (seeded by seed + epoch), so
the data position is the step number alone and a resumed run sees exactly the batches it would
have seen.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import pickle
import time

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from alignfast.data import load_records, prepare_dataset
from alignfast.trainers import checkpoint as ckpt
from alignfast.trainers.config import TrainConfig
from alignfast.trainers.metrics import MetricsLogger
from alignfast.trainers.modeling import (HiddenStatesModel, apply_peft, disable_dropout, load_causal_lm,
                                         load_tokenizer)
from alignfast.trainers.schedule import make_optimizer, make_scheduler

logger = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """Training could not go on (e.g. too many non-finite losses in a row)."""


class Trainer:
    config_class = TrainConfig
    data_kind = "sft"

    def __init__(self, config: TrainConfig, *, model=None, tokenizer=None, train_dataset=None,
                 eval_dataset=None, accelerator: Accelerator | None = None):
        """config: a validated config. model/tokenizer: objects to use instead of loading `config.model`.
        train_dataset/eval_dataset: a list of records or a path, instead of `config.dataset`/`eval_dataset`.
        Order: config checks, then data (tokenizer only), then the model: bad data fails before a load."""
        self.cfg = config.validate()
        self.accelerator = accelerator or Accelerator(cpu=self.cfg.cpu)
        self.run_id = self.cfg.run_name or f"{self.cfg.stage}-{self.cfg.config_hash()}"
        set_seed(self.cfg.seed)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.cfg)
        self.train_data, self.eval_data = self._load_data(train_dataset, eval_dataset)
        self.collator = self.build_collator()
        self.model = self.build_model(model)
        if getattr(self.cfg, "disable_dropout", False):  # DPO, KTO, reward (TRL's default there)
            disable_dropout(self.model)
        self.setup()  # stage-specific: reference model, precomputed log-probs ...
        self.optimizer = make_optimizer(self.cfg, self.model)
        self.steps_per_epoch = len(self.train_data) // self.global_batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"per_device_batch_size: the dataset has {len(self.train_data)} usable examples, "
                             f"fewer than one global batch ({self.global_batch_size} = batch "
                             f"{self.cfg.per_device_batch_size} × accumulation {self.cfg.gradient_accumulation_steps}"
                             f" × {self.accelerator.num_processes} process(es))")
        self.total_steps = self.cfg.max_steps if self.cfg.max_steps > 0 else \
            max(1, math.ceil(self.cfg.num_epochs * self.steps_per_epoch))
        self.scheduler = make_scheduler(self.cfg, self.optimizer, self.total_steps * self.updates_per_step())
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.step = 0
        self.bad_in_a_row = 0
        self.skipped_steps = 0

    # ---- stage hooks ----------------------------------------------------------------------------
    def build_collator(self):
        raise NotImplementedError

    def build_model(self, model):
        model = model if model is not None else load_causal_lm(self.cfg)
        return HiddenStatesModel(apply_peft(self.cfg, model))

    def setup(self) -> None:
        """Called after the model is built, before the optimizer and `accelerator.prepare`."""

    def count_items(self, batch) -> int:
        raise NotImplementedError

    def update_items(self, n_global: torch.Tensor) -> torch.Tensor:
        """The normaliser of an update's loss: by default its items across its micro-batches and the
        processes (TRL's `num_items_in_batch`)."""
        return n_global

    def updates_per_step(self) -> int:
        """Optimizer updates per training step (1; online stages: several per rollout)."""
        return 1

    def run_step(self, step: int) -> dict:
        """One training step: metrics, with the `tokens` it processed (all processes)."""
        micro = self.micro_batches(step)
        tokens = sum(int(b["attention_mask"].sum()) for b in micro) * self.accelerator.num_processes
        return {**self.training_step(micro), "tokens": tokens}

    def compute_loss(self, model, batch):
        raise NotImplementedError

    def save_model(self, path: str) -> None:
        """The final model in Hugging Face format (safetensors) with its tokenizer."""
        module = self.accelerator.unwrap_model(self.model)
        state = self._full_state("causal_lm.")
        if self.accelerator.is_main_process:
            module.causal_lm.save_pretrained(path, state_dict=state)
            self.tokenizer.save_pretrained(path)

    def _full_state(self, prefix: str) -> dict | None:
        """The full weights of the trained module under `prefix`, prefix stripped (gathered from the
        shards under FSDP2: every process must call this); None when not sharded (save as is)."""
        module = self.accelerator.unwrap_model(self.model)
        if not ckpt.is_sharded(module):
            return None
        state = ckpt.full_model_state(module)
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    # ---- data ------------------------------------------------------------------------------------
    @property
    def global_batch_size(self) -> int:
        return self.cfg.per_device_batch_size * self.cfg.gradient_accumulation_steps * self.accelerator.num_processes

    def _prepare(self, source, what: str):
        split = self.cfg.dataset_split if what == "dataset" else self.cfg.eval_split
        records = load_records(source, split)
        return prepare_dataset(records, self.data_kind, self.tokenizer, max_length=self.cfg.max_length,
                               on_bad_record=self.cfg.on_bad_record).examples

    def _load_data(self, train_source, eval_source):
        train_source = train_source if train_source is not None else self.cfg.dataset
        eval_source = eval_source if eval_source is not None else self.cfg.eval_dataset
        if train_source is None:
            raise ValueError("dataset: no training data (--dataset or dataset=...)")
        train = self._prepare(train_source, "dataset")
        if eval_source is not None:
            return train, self._prepare(eval_source, "eval_dataset")
        n_eval = int(len(train) * self.cfg.eval_fraction)
        if n_eval == 0:
            return train, []
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.cfg.seed)).tolist()
        return [train[i] for i in order[n_eval:]], [train[i] for i in order[:n_eval]]

    def step_indices(self, step: int) -> list[list[int]]:
        """Indices into train_data of this process's micro-batches of step `step`."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.train_data), generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
        g = self.global_batch_size
        window = order[k * g:(k + 1) * g].tolist()
        b, world, rank = self.cfg.per_device_batch_size, self.accelerator.num_processes, self.accelerator.process_index
        return [window[(m * world + rank) * b:(m * world + rank + 1) * b]
                for m in range(self.cfg.gradient_accumulation_steps)]

    def micro_batches(self, step: int) -> list[dict]:
        """This process's micro-batches of optimizer step `step` (collated, on the device)."""
        return [self.to_device(self.collator([self.train_data[i] for i in idx])) for idx in self.step_indices(step)]

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    # ---- reductions ------------------------------------------------------------------------------
    def _reduce_sum(self, values: list[torch.Tensor]) -> torch.Tensor:
        t = torch.stack([v.detach().float().to(self.accelerator.device) for v in values])
        return self.accelerator.reduce(t, reduction="sum") if self.accelerator.num_processes > 1 else t

    @staticmethod
    def _weighted(value, weight: int):
        """A metric (a value, or a (sum, count) pair) scaled by 0 or 1."""
        if isinstance(value, tuple):
            return value[0] * weight, torch.as_tensor(value[1], dtype=torch.float32) * weight
        return value * weight

    @staticmethod
    def _split_metric(value):
        if isinstance(value, tuple):
            return value[0].detach(), torch.as_tensor(value[1], dtype=torch.float32)
        return value.detach(), None

    def _finish_metrics(self, loss_sum, n_items, metric_sums: dict, metric_counts: dict) -> dict:
        names = list(metric_sums)
        counted = [n for n in names if metric_counts[n] is not None]
        totals = self._reduce_sum([loss_sum, n_items] + [metric_sums[n] for n in names]
                                  + [metric_counts[n] for n in counted])
        n = totals[1].item()
        out = {"loss": totals[0].item() / max(n, 1)}
        counts = dict(zip(counted, totals[2 + len(names):].tolist()))
        for i, name in enumerate(names):
            denom = counts.get(name, n)
            if denom:  # left out when nothing counted it (KTO's chosen rewards on an eval without a chosen example)
                out[name] = totals[2 + i].item() / denom
        return out

    @staticmethod
    def _accumulate(sums: dict, counts: dict, metrics: dict) -> None:
        for name, value in metrics.items():
            s, c = Trainer._split_metric(value)
            sums[name] = sums[name] + s if name in sums else s
            if c is not None:
                counts[name] = counts[name] + c if counts.get(name) is not None else c
            else:
                counts.setdefault(name, None)

    # ---- one optimizer step ---------------------------------------------------------------------
    def training_step(self, micro: list[dict]) -> dict:
        acc, model = self.accelerator, self.model
        n_local = sum(self.count_items(b) for b in micro)
        n_global = self.update_items(self._reduce_sum([torch.tensor(float(n_local))])[0])
        scale = acc.num_processes / n_global.clamp(min=1.0)
        loss_sum = torch.zeros((), device=acc.device)
        sums, counts = {}, {}
        for i, batch in enumerate(micro):
            sync = i == len(micro) - 1
            with contextlib.nullcontext() if sync else acc.no_sync(model):
                loss, metrics = self.compute_loss(model, batch)
                acc.backward(loss * scale)
            loss_sum = loss_sum + loss.detach().float()
            self._accumulate(sums, counts, metrics)
        out = self._finish_metrics(loss_sum, torch.tensor(float(n_local)), sums, counts)
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        grad_norm = acc.clip_grad_norm_(model.parameters(), max_norm)
        out["grad_norm"] = float(grad_norm)
        out["lr"] = self.scheduler.get_last_lr()[0]
        if math.isfinite(out["loss"]) and math.isfinite(out["grad_norm"]):
            self.optimizer.step()
            self.scheduler.step()
            self.bad_in_a_row = 0
        else:
            self.bad_in_a_row += 1
            self.skipped_steps += 1
            out["skipped"] = True
        self.optimizer.zero_grad(set_to_none=True)
        return out

    # ---- loop ------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Runs to `total_steps` (resuming first if `resume_from`), evaluates, checkpoints, saves the
        final model to output_dir. Returns the last training metrics (and `eval_*` ones)."""
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        resumed = self._maybe_resume()
        log = MetricsLogger(cfg, self.run_id, resume_step=resumed, console=tqdm.write) \
            if acc.is_main_process else None
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.run_id,
                   disable=cfg.disable_tqdm or not acc.is_local_main_process)
        self.model.train()
        last, last_saved = {}, resumed
        try:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                last = self.run_step(self.step)
                self.step += 1
                last["tokens_per_s"] = last.pop("tokens") / max(time.perf_counter() - t0, 1e-9)
                last["epoch"] = self.step / self.steps_per_epoch
                if last.get("skipped"):
                    msg = (f"step {self.step}: non-finite loss/gradient (loss={last['loss']}, grad_norm="
                           f"{last['grad_norm']}), update skipped ({self.bad_in_a_row} in a row)")
                    logger.warning(msg)
                    if log:
                        log.log(self.step, "train", last)
                    if self.bad_in_a_row >= cfg.max_bad_steps:
                        raise TrainingStopped(
                            f"stopping: {self.bad_in_a_row} non-finite losses in a row (max_bad_steps="
                            f"{cfg.max_bad_steps}); the last good checkpoint is "
                            f"{ckpt.checkpoint_dirs(cfg.output_dir)[-1][1] if ckpt.checkpoint_dirs(cfg.output_dir) else 'none'}"
                            f" — lower the learning rate or check the data")
                elif log and (self.step % cfg.logging_steps == 0 or self.step == self.total_steps):
                    log.log(self.step, "train", last, echo=cfg.disable_tqdm)
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
                if cfg.eval_steps and self.step % cfg.eval_steps == 0 and self.step < self.total_steps:
                    self._log_eval(log)
                if cfg.save_steps and self.step % cfg.save_steps == 0 and not self.bad_in_a_row:
                    self.save_checkpoint()
                    last_saved = self.step
            if not last and log:  # a finished run resumed: its last training row, as the run returned it
                last = log.last_row("train")
            last.update({f"eval_{k}": v for k, v in self._log_eval(log).items()})
            if last_saved != self.step:
                self.save_checkpoint()
            self.save_model(cfg.output_dir)  # every process (gathers the shards under FSDP2), main writes
            acc.wait_for_everyone()
        finally:
            bar.close()
            if log:
                log.close()
        return last

    def _log_eval(self, log) -> dict:
        if not self.eval_data:
            return {}
        metrics = self.evaluate()
        if log:
            log.log(self.step, "eval", metrics)
        return metrics

    @torch.no_grad()
    def evaluate(self, examples=None) -> dict:
        """Loss and metrics over `examples` (default: the eval set), split across processes."""
        examples = self.eval_data if examples is None else examples
        acc = self.accelerator
        mine, size = examples[acc.process_index::acc.num_processes], self.cfg.per_device_batch_size
        # (examples, weight) per batch. Every process runs as many batches as the largest share needs,
        # a short one filling with batches weighted 0: the collectives inside a step (KTO's KL gather,
        # FSDP's gathers) and the metrics' all-reduce need every process, with the same names.
        n_batches = math.ceil(math.ceil(len(examples) / acc.num_processes) / size)
        batches = [(mine[i * size:(i + 1) * size], 1) for i in range(n_batches)]
        batches = [(chunk, 1) if chunk else (examples[:1], 0) for chunk, _ in batches]
        was_training = self.model.training
        self.model.eval()
        loss_sum, n = torch.zeros((), device=acc.device), 0
        sums, counts = {}, {}
        for chunk, weight in batches:
            batch = self.to_device(self.collator(chunk))
            loss, metrics = self.compute_loss(self.model, batch)
            loss_sum, n = loss_sum + weight * loss.float(), n + weight * self.count_items(batch)
            self._accumulate(sums, counts, {k: self._weighted(v, weight) for k, v in metrics.items()})
        self.model.train(was_training)
        return self._finish_metrics(loss_sum, torch.tensor(float(n)), sums, counts)

    # ---- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self) -> str:
        state = {"run_id": self.run_id, "config_hash": self.cfg.config_hash(), "stage": self.cfg.stage,
                 "data_fingerprint": self.data_fingerprint, "skipped_steps": self.skipped_steps,
                 "total_steps": self.total_steps, **self.extra_state()}
        return ckpt.save_checkpoint(self.accelerator, self.cfg.output_dir, self.step,
                                    model=self.accelerator.unwrap_model(self.model), optimizer=self.optimizer,
                                    scheduler=self.scheduler, state=state, config=self.cfg.to_dict(),
                                    keep=self.cfg.save_total_limit)

    @functools.cached_property
    def data_fingerprint(self) -> str:
        """sha256 of the tokenized training examples: the config hash names the dataset by its path,
        this catches a file edited (or a tokenizer changed) under the same name before a resume."""
        digest = hashlib.sha256()
        for example in self.train_data:
            digest.update(pickle.dumps(sorted(example.items()), protocol=4))
        return digest.hexdigest()[:16]

    def extra_state(self) -> dict:
        """A stage's own training state (JSON values, e.g. PPO's adaptive β), saved in the checkpoint's
        trainer_state.json and handed back to `load_extra_state` on resume."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restores what `extra_state` saved (`state`: the checkpoint's whole trainer state)."""

    def _maybe_resume(self) -> int | None:
        if not self.cfg.resume_from:  # every process checks (so all raise together), the main one deletes
            ckpt.clear_for_new_run(self.cfg.output_dir, self.cfg.overwrite_output_dir,
                                   delete=self.accelerator.is_main_process)
            self.accelerator.wait_for_everyone()
            return None
        candidates = ckpt.resume_candidates(self.cfg.resume_from, self.cfg.output_dir)
        hashes = (self.cfg.config_hash(), self.cfg.config_hash(portable=False))  # the second: older runs'
        for i, path in enumerate(candidates):
            try:
                state = ckpt.load_checkpoint(self.accelerator, path, model=self.accelerator.unwrap_model(self.model),
                                             optimizer=self.optimizer, scheduler=self.scheduler, config_hash=hashes)
                break
            except ckpt.CorruptCheckpoint as e:  # torn by a crash: nothing was loaded from it
                if i + 1 == len(candidates):
                    raise
                logger.warning("%s; resuming from the one before, %s", e, candidates[i + 1])
        if state.get("data_fingerprint", self.data_fingerprint) != self.data_fingerprint:
            raise ckpt.CheckpointError(
                f"checkpoint {path!r} was trained on other data: this run's tokenized training examples differ "
                "from the checkpoint's (an edited dataset file, another tokenizer), so resuming would not continue "
                "that run. Start over in another output_dir or with overwrite_output_dir=true")
        self.step, self.skipped_steps = state["step"], state.get("skipped_steps", 0)
        self.load_extra_state(state)
        logger.info("resumed from %s at step %d", path, self.step)
        return self.step

    def end_training(self) -> None:
        # every process reaches the end before the group is torn down: a process that exits while
        # another still talks to the rendezvous store can abort it ("terminate called ...")
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
