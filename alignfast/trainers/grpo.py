"""GRPO: group-relative policy optimisation on sampled completions (Shao et al., DeepSeekMath, 2024,
https://arxiv.org/abs/2402.03300), with the loss types of TRL's `GRPOTrainer`.

Each prompt is sampled G = `num_generations` times; the G completions are scored (reward functions
and/or a reward model, weighted and summed: r_i) and each gets its group-relative advantage

    A_i = (r_i − mean_g r) / (std_g r + 1e-4)         scale_rewards=True  (std: unbiased, within the group)
    A_i =  r_i − mean_g r                             scale_rewards=False (Dr. GRPO, Liu et al. 2025)

Then `num_iterations` (μ) passes over the rollout, each split into `num_mini_batches` optimizer
updates, minimise per token (ρ = π/π_old, k3 the KL estimate to the frozen reference):

    l_t = −min(ρ·A, clip(ρ, 1 − ε, 1 + ε_high)·A) + β·k3_t

The policy's log-probs are of the sampling distribution (logits / temperature), from the hidden
states and the lm_head weight by the fused `LinearGRPOLoss` (no [tokens, vocab] logits). π_old is the
rollout policy: its log-probs are computed once, right after sampling, when a rollout feeds more than
one optimizer update (μ > 1 or num_mini_batches > 1); with a single update they would equal π's, so
the loss runs on-policy (π_old = π detached: ρ = 1, as TRL). The reference log-probs are likewise
computed once per rollout; with β = 0 no reference model exists at all.

Normalisation. The base trainer divides the sums `compute_loss` returns by the global `count_items`
of the update (all its micro-batches, all processes), so each loss type's normaliser is the one of
the whole optimizer update's mini-batch, whatever the split into micro-batches and processes:

    dapo, cispo Σ l·m / (N / k)          N = the rollout's loss tokens (all processes), k = num_mini_batches:
                                        every update of a rollout divides by the same number, as TRL's
                                        generation-batch normaliser (equal to the update's token mean when k = 1)
    bnpo        Σ l·m / Σ m             count_items = loss tokens (the update's token mean; TRL's bnpo
                                        normalises per micro-batch, which depends on the split)
    grpo, sapo  Σ_i (Σ_t l·m / Σ_t m)   count_items = completions (per-sequence mean, then mean over
                                        the update's completions; masked ones count, adding 0, as TRL)
    dr_grpo     Σ l·m / (B·L)           count_items = completions × L, L = max_new_tokens (the constant)
    luspo       Σ_i Σ_t l·m             count_items = completions (per-sequence sum, mean over completions)

`importance_sampling_level="sequence"` (GSPO), `delta` and `use_bias_correction_kl` are `grpo_loss`'s.

`mask_truncated_completions`: a completion that did not end with EOS has its tokens removed from the
loss (labels ignored); it still takes part in its group's reward statistics, as in TRL.

Batches: `per_device_batch_size` counts prompts, so a micro-batch holds per_device_batch_size × G
completions and a group never spans processes (advantages are local). Logged per step: the rollout's
reward, reward_std, rewards/<source>, frac_reward_zero_std, completion_length, eos_fraction; the
updates' loss, kl (β > 0), entropy, clip_ratio/{low,high,region}_mean (token means), grad_norm.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from alignfast.data import IGNORE_INDEX, RolloutCollator
from alignfast.data.collators import encode_rows
from alignfast.losses import LinearGRPOLoss
from alignfast.losses.grpo import GRPO_LOSS_TYPES, IMPORTANCE_SAMPLING_LEVELS, TOKEN_SUM_LOSS_TYPES, check_delta
from alignfast.trainers.config import opt
from alignfast.trainers.modeling import full_head
from alignfast.trainers.online import OnlineConfig, OnlineTrainer
from alignfast.trainers.reference import ReferencePolicy
from alignfast.trainers.sequence import shift, token_logps

ADVANTAGE_EPS = 1e-4  # TRL's: keeps a near-constant group's advantages bounded


@dataclass
class GRPOConfig(OnlineConfig):
    num_generations: int = opt(4, "G: completions sampled per prompt (>= 2; per_device_batch_size counts prompts)")
    beta: float = opt(0.0, "β: weight of the k3 KL to the reference (0: no reference model is loaded)")
    epsilon: float = opt(0.2, "ε: lower clip of the ratio π/π_old")
    epsilon_high: float | None = opt(None, "upper clip (DAPO's clip-higher, e.g. 0.28); default: epsilon")
    num_iterations: int = opt(1, "μ: passes (optimizer updates) over each rollout")
    loss_type: str = opt("dapo", "dapo, bnpo, cispo (token mean of the update), grpo, sapo (per-sequence mean), "
                                 "dr_grpo (Σ / (completions · max_new_tokens)), luspo (per-sequence sum)")
    importance_sampling_level: str = opt("token", "token: ρ per token; sequence: GSPO's one ρ per completion")
    delta: float | None = opt(None, "two-sided GRPO: cap of ρ in the unclipped term (>= 1 + epsilon_high)")
    use_bias_correction_kl: bool = opt(True, "weight the KL by ρ (TRL's default: the unbiased reverse-KL gradient)")
    scale_rewards: bool = opt(True, "divide advantages by the group's reward std (False: Dr. GRPO)")
    mask_truncated_completions: bool = opt(False, "leave completions that did not end with EOS out of the loss")
    learning_rate: float = opt(1e-6, "AdamW peak learning rate")

    stage = "grpo"

    def identity(self, portable: bool = True) -> dict:
        """As the base's, less the options added after runs existed where their value trains as those runs
        did (default ratio level and clipping; the KL weighting without a KL term): such runs still resume."""
        d = super().identity(portable)
        for key, before in (("importance_sampling_level", "token"), ("delta", None)):
            if d.get(key) == before:
                del d[key]
        if self.beta == 0:
            d.pop("use_bias_correction_kl", None)
        return d

    def validate(self):
        super().validate()
        if isinstance(self.num_generations, bool) or not isinstance(self.num_generations, int) \
                or self.num_generations < 2:
            raise ValueError(f"num_generations must be an int >= 2 (group advantages need 2 samples), "
                             f"got {self.num_generations!r}")
        if isinstance(self.num_iterations, bool) or not isinstance(self.num_iterations, int) \
                or self.num_iterations < 1:
            raise ValueError(f"num_iterations must be an int >= 1, got {self.num_iterations!r}")
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"loss_type: {self.loss_type!r} is unknown; choose one of {list(GRPO_LOSS_TYPES)}")
        for key in ("beta", "epsilon"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)!r}")
        if self.epsilon_high is not None and not self.epsilon_high >= 0:
            raise ValueError(f"epsilon_high must be >= 0 or None, got {self.epsilon_high!r}")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(f"importance_sampling_level: {self.importance_sampling_level!r} is unknown; choose one "
                             f"of {list(IMPORTANCE_SAMPLING_LEVELS)}")
        check_delta(self.delta, self.loss_type, self.epsilon if self.epsilon_high is None else self.epsilon_high)
        if not self.temperature > 0:  # the loss needs log-probs of the sampling distribution: greedy has none
            raise ValueError(f"temperature must be > 0 for GRPO (greedy samples make every group constant), "
                             f"got {self.temperature!r}")
        if self.beta == 0 and self.ref_model is not None:
            raise ValueError("ref_model: beta=0 uses no reference model; set beta > 0 or drop ref_model")
        return self


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: bool = True) -> torch.Tensor:
    """rewards [N] (N = prompts × G, each prompt's G samples consecutive) -> advantages [N] fp32:
    r − the group mean, divided by (the group's unbiased std + 1e-4) when `scale_rewards`."""
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards must be [prompts × {num_generations}], got shape {tuple(rewards.shape)}")
    groups = rewards.double().view(-1, num_generations)
    adv = groups - groups.mean(1, keepdim=True)
    if scale_rewards:
        adv = adv / (groups.std(1, keepdim=True) + ADVANTAGE_EPS)
    constant = (groups == groups[:, :1]).all(1, keepdim=True)  # no signal: exactly 0, not rounding noise
    return adv.masked_fill(constant, 0.0).view(-1).float()


def completion_values(values: torch.Tensor, rows: list[dict]) -> list[torch.Tensor]:
    """[B, T-1] per-token values aligned with the shifted targets of `encode_rows(rows)` -> each
    row's values over its completion tokens (1-D, on the CPU): the inverse of `RolloutCollator`."""
    out = []
    for b, row in enumerate(rows):
        start = len(row["prompt_ids"]) - 1
        out.append(values[b, start:start + len(row["completion_ids"])].float().cpu())
    return out


class GRPOTrainer(OnlineTrainer):
    """GRPO on a prompt dataset (`prompt` plus any columns the reward functions take)."""

    config_class = GRPOConfig

    @property
    def needs_old_logps(self) -> bool:
        """π_old differs from π only when a rollout feeds several optimizer updates."""
        return self.updates_per_step() > 1

    def build_collator(self):
        token_fields = ["old_logps"] if self.needs_old_logps else []
        token_fields += ["ref_logps"] if self.cfg.beta > 0 else []
        return RolloutCollator(self.tokenizer.pad_token_id, token_fields=token_fields,
                               sequence_fields=("advantages", "keep"))

    def setup(self) -> None:
        super().setup()  # the reward sources
        cfg = self.cfg
        if cfg.mask_truncated_completions and self.tokenizer.eos_token_id is None:
            raise ValueError("mask_truncated_completions: the tokenizer has no EOS token to end a completion")
        self.loss_fn = LinearGRPOLoss(beta=cfg.beta, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                                      loss_type=cfg.loss_type, max_completion_length=cfg.max_new_tokens,
                                      importance_sampling_level=cfg.importance_sampling_level, delta=cfg.delta,
                                      use_bias_correction_kl=cfg.use_bias_correction_kl,
                                      temperature=cfg.temperature, softcap=self.model.head().softcap,
                                      backend=cfg.backend, chunk_size=cfg.chunk_size)
        self.reference = ReferencePolicy(cfg, self.model, self.accelerator.device) if cfg.beta > 0 else None

    # ---- the rollout ----------------------------------------------------------------------------
    def samples_per_prompt(self) -> int:
        return self.cfg.num_generations

    def rollout_epochs(self) -> int:
        return self.cfg.num_iterations

    def make_experience(self, examples, completions):
        cfg = self.cfg
        total, per_source = self.rewards(examples, completions)
        advantages = group_advantages(total, cfg.num_generations, cfg.scale_rewards)
        eos = self.tokenizer.eos_token_id
        ended = [eos is not None and bool(c) and c[-1] == eos for c in completions]
        rows = [{"prompt_ids": e["prompt_ids"], "completion_ids": c, "advantages": float(a),
                 "keep": 0.0 if cfg.mask_truncated_completions and not end else 1.0}
                for e, c, a, end in zip(examples, completions, advantages.tolist(), ended)]
        for key, values in self.rollout_logps(rows).items():
            for row, v in zip(rows, values):
                row[key] = v
        groups = total.view(-1, cfg.num_generations)
        metrics = {"reward": float(total.mean()), "reward_std": float(total.std()),
                   **{f"rewards/{name}": float(v.mean()) for name, v in per_source.items()},
                   "frac_reward_zero_std": float((groups.std(1) == 0).float().mean()),
                   "completion_length": sum(map(len, completions)) / len(completions),
                   "eos_fraction": sum(ended) / len(ended)}
        return rows, metrics

    @torch.no_grad()
    def rollout_logps(self, rows: list[dict]) -> dict[str, list[torch.Tensor]]:
        """Per-token log-probs of the sampled completions (tempered, fused op, no gradient) that the
        updates need: π_old's (`old_logps`) and the reference's (`ref_logps`), one micro-batch at a time."""
        cfg, out = self.cfg, {}
        if self.needs_old_logps:
            out["old_logps"] = []
        if self.reference is not None:
            out["ref_logps"] = []
        size = cfg.per_device_batch_size * cfg.num_generations
        for i in range(0, len(rows) if out else 0, size):
            chunk = rows[i:i + size]
            batch = self.to_device(encode_rows([r["prompt_ids"] for r in chunk],
                                               [r["completion_ids"] for r in chunk], self.tokenizer.pad_token_id))
            args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
            if "old_logps" in out:
                lp = token_logps(self.model, *args, temperature=cfg.temperature, backend=cfg.backend,
                                 chunk_size=cfg.chunk_size)[0]
                out["old_logps"] += completion_values(lp, chunk)
            if "ref_logps" in out:
                lp = self.reference.token_logps(*args, temperature=cfg.temperature)
                out["ref_logps"] += completion_values(lp, chunk)
        return out

    # ---- the update -----------------------------------------------------------------------------
    @staticmethod
    def loss_targets(batch) -> torch.Tensor:
        """[B, T-1] shifted labels, the tokens of masked (truncated) completions ignored."""
        targets = batch["labels"][:, 1:]
        return targets.masked_fill(batch["keep"][:, None] == 0, IGNORE_INDEX)

    def update_items(self, n_global):
        """dapo, cispo: the rollout's loss tokens over its updates per pass, the same for every update (TRL's
        generation-batch `num_items_in_batch` rescaled to one update); the others: the update's own."""
        if self.cfg.loss_type in ("dapo", "cispo"):
            return self.rollout_items / self.cfg.num_mini_batches
        return n_global

    def count_items(self, batch) -> int:
        if self.cfg.loss_type in TOKEN_SUM_LOSS_TYPES:
            return int((self.loss_targets(batch) != IGNORE_INDEX).sum())
        rows = batch["input_ids"].shape[0]
        return rows * self.cfg.max_new_tokens if self.cfg.loss_type == "dr_grpo" else rows

    def compute_loss(self, model, batch):
        hidden, _ = shift(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]),
                          batch["labels"])
        targets = self.loss_targets(batch)  # the shifted labels, truncated completions masked
        with full_head(model) as head:
            loss, metrics = self.loss_fn(hidden, head.weight, targets, batch["advantages"], head.bias,
                                         old_logprobs=batch.get("old_logps"), ref_logps=batch.get("ref_logps"))
        # The module normalises over this micro-batch (its own count_items, tokens clamped at 1 as the
        # module's); the base wants the sum, normalised over the whole update.
        tokens = (targets != IGNORE_INDEX).sum()
        local = max(self.count_items(batch), 1)
        return loss * local, {name: (value * tokens, tokens) for name, value in metrics.items()}
