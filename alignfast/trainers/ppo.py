"""PPO for RLHF with four models (Ouyang et al., InstructGPT, 2022, https://arxiv.org/abs/2203.02155;
Schulman et al., PPO, 2017, https://arxiv.org/abs/1707.06347), with the options of TRL's PPOTrainer.

    policy π        trainable causal LM (`HiddenStatesModel`: hidden states, the lm_head to fused ops)
    value V         trainable backbone + scalar head per token: `value_model`, else a copy of the
                    reward model (as TRL), else the policy's checkpoint with a fresh score head
    reference π_ref frozen: a copy of the initial policy, or `ref_model`
    reward          frozen: a reward model and/or Python reward functions (`Rewards`)

One step = one rollout (sample, score, experience) then `num_ppo_epochs` passes over it, each split
into `num_mini_batches` optimizer updates (`OnlineTrainer`). The experience of completion y of prompt x
(per completion token t, T the last one; logps of the tempered sampling distribution):

    score     s = Σ_k w_k·reward_k(x, y)  − missing_eos_penalty·[y has no EOS]
    KL_t      k1: log π − log π_ref;   k3: e^{log π_ref − log π} − (log π_ref − log π) − 1;
              full: Σ_v π_v (log π_v − log π_ref,v), the exact KL over the vocabulary (`linear_kl`,
              from both models' hidden states, no logits)
    r_t       = −β·KL_t + s·[t = T]                     (β: `kl_coef`, fixed or adaptive)
    A_t, R_t  = GAE(γ, λ) of r and the rollout values V_old;  R_t = A_t + V_old,t
    Â_t       = (A_t − mean A) / std A   over the rollout's completion tokens (this process's)

and each update minimises, token-mean over the update's completion tokens (the base divides the
sums `compute_loss` returns by the update's global token count: independent of the micro-batching),

    loss = max(−Â·ρ, −Â·clip(ρ, 1 ± cliprange)) + vf_coef·½·max((V − R)², (V_clip − R)²) − entropy_coef·H
           ρ = π/π_old,  V_clip = V_old + clip(V − V_old, ±cliprange_value).

The KL is in the reward (so it is credited through GAE, as in InstructGPT), not in the loss.

Reading the metrics (names as TRL's). `objective/scores` is what the reward source says,
`objective/kl` how far the policy has moved from the reference (nats per completion),
`objective/rlhf_reward` = score − β·KL what PPO maximises. *Reward hacking*: the score climbs while
the KL explodes (tens of nats and rising) and the samples turn odd; raise `kl_coef` (or let the
adaptive controller, `adaptive_kl`, hold the KL at `target_kl`). *Mode collapse*: the entropies
(`policy/entropy_avg`, full-vocab per token; `objective/entropy`, −log π of the samples per
completion) fall towards 0 while the score plateaus and `policy/approxkl_avg`, `policy/clipfrac_avg`
drop (nothing left to move): more KL, a higher temperature, `entropy_coef`. *Verbosity*:
`completion_length` grows with the score, and `eos_fraction` falls as completions run into
`max_new_tokens` (`missing_eos_penalty` counters that). A value model that fits nothing shows
`val/explained_variance` ≤ 0 and a large `loss/value_avg`: the advantages are then mostly noise.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from alignfast.data import IGNORE_INDEX, RolloutCollator
from alignfast.data.collators import encode_rows
from alignfast.losses import LinearPPOLoss
from alignfast.losses.gae import gae
from alignfast.losses.kl import token_kl
from alignfast.losses.ppo import ppo_value_loss
from alignfast.ops import linear_kl, linear_logprobs
from alignfast.ops.kl import kl_backends
from alignfast.trainers.config import _check_model_path, opt
from alignfast.trainers.kl_controller import KLController
from alignfast.trainers.modeling import disable_dropout, full_head
from alignfast.trainers.online import OnlineConfig, OnlineTrainer
from alignfast.trainers.reference import ReferencePolicy
from alignfast.trainers.sequence import shift
from alignfast.trainers.value import PolicyAndValue, load_value_model

KL_ESTIMATORS = ("k1", "k3", "full")
WHITEN_EPS = 1e-8


@dataclass
class PPOConfig(OnlineConfig):
    num_ppo_epochs: int = opt(4, "passes over each rollout (each pass: num_mini_batches optimizer updates)")
    kl_coef: float = opt(0.05, "β: weight of the per-token KL penalty in the reward (adaptive: its start)")
    kl_estimator: str = opt("k1", "per-token KL in the reward: k1 (log π − log π_ref), k3, or full (exact, "
                                  "over the vocabulary)")
    adaptive_kl: bool = opt(False, "adapt β towards target_kl (Ziegler et al. 2019)")
    target_kl: float = opt(6.0, "adaptive β: the target KL, nats per completion")
    kl_horizon: int = opt(10000, "adaptive β: horizon, in completions, of the proportional controller")
    cliprange: float = opt(0.2, "ε: clip range of the ratio π/π_old")
    cliprange_value: float = opt(0.2, "clip range of the value around V_old")
    vf_coef: float = opt(0.1, "weight of the value loss")
    entropy_coef: float = opt(0.0, "weight of the entropy bonus (0: none)")
    gamma: float = opt(1.0, "GAE discount γ")
    lam: float = opt(0.95, "GAE λ")
    whiten_rewards: bool = opt(False, "scale the per-token rewards by their std over the rollout (mean kept)")
    missing_eos_penalty: float | None = opt(None, "subtracted from the score of a completion without EOS")
    value_model: str | None = opt(None, "value model directory; default: the reward model's weights, "
                                        "else the policy's checkpoint with a fresh head")

    stage = "ppo"

    def validate(self):
        super().validate()
        if isinstance(self.num_ppo_epochs, bool) or not isinstance(self.num_ppo_epochs, int) \
                or self.num_ppo_epochs < 1:
            raise ValueError(f"num_ppo_epochs must be an int >= 1, got {self.num_ppo_epochs!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator: {self.kl_estimator!r} is unknown; "
                             f"choose one of {list(KL_ESTIMATORS)}")
        for key in ("kl_coef", "cliprange", "cliprange_value", "vf_coef", "entropy_coef"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)!r}")
        for key in ("target_kl", "kl_horizon"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)!r}")
        for key in ("gamma", "lam"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key} must be in [0, 1], got {getattr(self, key)!r}")
        if self.missing_eos_penalty is not None and not self.missing_eos_penalty >= 0:
            raise ValueError(f"missing_eos_penalty must be >= 0 or None, got {self.missing_eos_penalty!r}")
        if not self.temperature > 0:  # the ratio and the KL need log-probs of the sampling distribution
            raise ValueError(f"temperature must be > 0 for PPO (greedy sampling has no log-probs), "
                             f"got {self.temperature!r}")
        if self.value_model is not None:
            _check_model_path("value_model", self.value_model)
        return self


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x − mean)/std over the masked elements (unbiased variance, as TRL), 0 elsewhere; with
    shift_mean=False the mean is added back (only the scale changes)."""
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n.clamp(min=1)
    var = ((x - mean).square() * m).sum() / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    return torch.where(mask, out if shift_mean else out + mean, torch.zeros_like(x))


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var(R − V)/Var(R) over the masked elements: 1 a perfect value model, ≤ 0 a useless one."""
    r, d = returns[mask].double(), (returns - values)[mask].double()
    var = r.var(unbiased=False)
    return float(1 - d.var(unbiased=False) / var) if var > 0 else float("nan")


def completion_slices(per_token: torch.Tensor, rows: list[dict]) -> list[torch.Tensor]:
    """[B, T-1] values aligned with the shifted targets of `encode_rows(rows)` -> each row's values over
    its completion tokens (1-D, fp32, CPU): the inverse of `RolloutCollator`."""
    out = []
    for b, row in enumerate(rows):
        start = len(row["prompt_ids"]) - 1
        out.append(per_token[b, start:start + len(row["completion_ids"])].float().cpu())
    return out


def pad_completions(values: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row 1-D tensors -> ([B, L] left-aligned, 0-padded; [B, L] bool mask), L the longest."""
    width = max(v.numel() for v in values)
    out = torch.zeros(len(values), width)
    mask = torch.zeros(len(values), width, dtype=torch.bool)
    for b, v in enumerate(values):
        out[b, :v.numel()], mask[b, :v.numel()] = v, True
    return out, mask


class PPOTrainer(OnlineTrainer):
    """PPO on a prompt dataset. `self.model` is a `PolicyAndValue`; the final policy is saved to
    output_dir (Hugging Face format), the value model to output_dir/value_model."""

    config_class = PPOConfig
    TOKEN_FIELDS = ("old_logps", "old_values", "advantages", "returns")

    # ---- models ---------------------------------------------------------------------------------
    def build_model(self, model):
        funcs, reward_model = self._reward_args
        if not (self.cfg.reward_funcs or funcs or reward_model is not None or self.cfg.reward_model):
            raise ValueError("reward_funcs / reward_model: PPO needs at least one reward source")
        policy = super().build_model(model)
        source = next(s for s in (self.cfg.value_model, reward_model, self.cfg.reward_model, self.cfg.model)
                      if s is not None)
        value = load_value_model(self.cfg, source, self.tokenizer.pad_token_id)
        return disable_dropout(PolicyAndValue(policy, value))

    def setup(self) -> None:
        super().setup()  # the reward sources
        cfg = self.cfg
        self.reference = ReferencePolicy(cfg, self.model.policy, self.accelerator.device)
        softcap = self.model.policy.head().softcap
        if cfg.kl_estimator == "full" and softcap is not None:
            raise ValueError("kl_estimator: 'full' (linear_kl) has no logit softcap; use k1 or k3")
        # kl_coef=0: the KL is in the reward (credited through GAE), not in the loss
        self.loss_fn = LinearPPOLoss(clip_eps=cfg.cliprange, loss_agg="token-mean", kl_coef=0.0,
                                     entropy_coef=cfg.entropy_coef, temperature=cfg.temperature,
                                     softcap=softcap, backend=cfg.backend, chunk_size=cfg.chunk_size)
        target = cfg.target_kl if cfg.adaptive_kl else None
        self.kl_ctl = KLController(cfg.kl_coef, target, float(cfg.kl_horizon))

    def build_collator(self):
        return RolloutCollator(self.tokenizer.pad_token_id, token_fields=self.TOKEN_FIELDS)

    def policy_and_value(self, model=None) -> PolicyAndValue:
        return self.accelerator.unwrap_model(self.model if model is None else model)

    def policy_lm(self):
        return self.policy_and_value().policy.causal_lm

    def rollout_epochs(self) -> int:
        return self.cfg.num_ppo_epochs

    # ---- the rollout ----------------------------------------------------------------------------
    def make_experience(self, examples, completions):
        cfg = self.cfg
        rows = [{"prompt_ids": e["prompt_ids"], "completion_ids": c} for e, c in zip(examples, completions)]
        scores, per_source = self.rewards(examples, completions)
        eos = self.tokenizer.eos_token_id
        has_eos = torch.tensor([eos is not None and c[-1:] == [eos] for c in completions])
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~has_eos).float()
        fields = self.rollout_forward(rows)
        logps, mask = pad_completions(fields["logps"])
        kl, values = pad_completions(fields["kl"])[0], pad_completions(fields["values"])[0]
        beta = self.kl_ctl.value
        non_score = -beta * kl
        rewards = non_score.clone()
        last = mask.sum(1) - 1
        rewards[torch.arange(len(rows)), last] += scores
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
        whitened = masked_whiten(advantages, mask)
        for b, row in enumerate(rows):
            n = len(row["completion_ids"])
            row.update(old_logps=logps[b, :n], old_values=values[b, :n], advantages=whitened[b, :n],
                       returns=returns[b, :n])
        seq_kl, seq_non_score = kl.sum(1), non_score.sum(1)
        metrics = {"objective/scores": float(scores.mean()), "objective/kl": float(seq_kl.mean()),
                   "objective/entropy": float(-logps.sum(1).mean()),
                   "objective/non_score_reward": float(seq_non_score.mean()),
                   "objective/rlhf_reward": float((scores + seq_non_score).mean()),
                   **{f"rewards/{name}": float(v.mean()) for name, v in per_source.items()},
                   "val/explained_variance": explained_variance(values, returns, mask),
                   "val/mean": float(values[mask].mean()),
                   "completion_length": float(mask.sum(1).float().mean()),
                   "eos_fraction": float(has_eos.float().mean()), "kl_coef": beta}
        return rows, metrics

    @torch.no_grad()
    def rollout_forward(self, rows: list[dict]) -> dict[str, list[torch.Tensor]]:
        """Per row, over its completion tokens: the policy's log-probs (`logps`, tempered, fused op),
        the old values, and the KL to the reference per `kl_estimator`; one micro-batch at a time,
        one forward of policy+value and one of the reference."""
        cfg = self.cfg
        out = {"logps": [], "values": [], "kl": []}
        kw = dict(temperature=cfg.temperature, backend=cfg.backend, chunk_size=cfg.chunk_size)
        for i in range(0, len(rows), cfg.per_device_batch_size):
            chunk = rows[i:i + cfg.per_device_batch_size]
            prompts, completions = [r["prompt_ids"] for r in chunk], [r["completion_ids"] for r in chunk]
            batch = self.to_device(encode_rows(prompts, completions, self.tokenizer.pad_token_id))
            hidden, values = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            hidden, targets = shift(hidden, batch["labels"])
            ref_hidden, ref_head = self.reference.hidden_states(batch["input_ids"], batch["attention_mask"])
            ref_hidden = ref_hidden[:, :-1]
            ref_lp = linear_logprobs(ref_hidden, ref_head.weight, targets, ref_head.bias,
                                     softcap=ref_head.softcap, **kw).logprobs
            with full_head(self.policy_and_value().policy) as head:
                lp = linear_logprobs(hidden, head.weight, targets, head.bias, softcap=head.softcap,
                                     **kw).logprobs
                if cfg.kl_estimator == "full":
                    kl = linear_kl(hidden, head.weight, ref_hidden, ref_head.weight, bias=head.bias,
                                   ref_bias=ref_head.bias, targets_mask=targets != IGNORE_INDEX,
                                   temperature=cfg.temperature, chunk_size=cfg.chunk_size,
                                   backend=cfg.backend if cfg.backend in kl_backends() else "auto")
                else:
                    kl = token_kl(lp, ref_lp, cfg.kl_estimator)
            out["logps"] += completion_slices(lp, chunk)
            out["values"] += completion_slices(values[:, :-1], chunk)
            out["kl"] += completion_slices(kl, chunk)
        return out

    # ---- the update -----------------------------------------------------------------------------
    def count_items(self, batch) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def compute_loss(self, model, batch):
        """(Σ over the micro-batch's completion tokens of the per-token policy + vf_coef·value loss,
        {metric: (sum, tokens)})."""
        hidden, values = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        hidden, targets = shift(hidden, batch["labels"])
        mask = targets != IGNORE_INDEX
        with full_head(self.policy_and_value(model).policy) as head:
            pg_loss, metrics = self.loss_fn(hidden, head.weight, targets, batch["old_logps"],
                                            batch["advantages"], head.bias)
        vf_loss, vf_metrics = ppo_value_loss(values[:, :-1], batch["old_values"], batch["returns"], mask,
                                             clip=self.cfg.cliprange_value)
        tokens = mask.sum()
        # both losses are token means over this micro-batch; the base wants the sum (it divides by the
        # update's token count over all micro-batches and processes)
        loss = (pg_loss + self.cfg.vf_coef * vf_loss) * tokens
        named = {"loss/policy_avg": metrics["policy_loss"], "loss/value_avg": vf_loss.detach(),
                 "policy/clipfrac_avg": metrics["clipfrac"], "policy/approxkl_avg": metrics["approx_kl"],
                 "val/clipfrac_avg": vf_metrics["vf_clipfrac"], "val/ratio": metrics["ratio_mean"]}
        if "entropy" in metrics:
            named["policy/entropy_avg"] = metrics["entropy"]
        return loss, {name: (value * tokens, tokens) for name, value in named.items()}

    # ---- the step: the adaptive β follows the rollout's KL (the mean over all processes) ----------
    def run_step(self, step: int) -> dict:
        out = super().run_step(step)
        self.kl_ctl.update(out["objective/kl"], self.global_batch_size * self.samples_per_prompt())
        return out

    def extra_state(self) -> dict:
        return {"kl_coef": self.kl_ctl.value}

    def load_extra_state(self, state: dict) -> None:
        self.kl_ctl.value = float(state.get("kl_coef", self.cfg.kl_coef))

    # ---- saving ---------------------------------------------------------------------------------
    def save_model(self, path: str) -> None:
        """The policy to `path`, the value model to `path`/value_model (both Hugging Face, with the
        tokenizer: the value model loads back as `value_model` or `reward_model`)."""
        module = self.policy_and_value()
        policy_state = self._full_state("policy.causal_lm.")
        value_state = self._full_state("value.seq_cls.")
        if self.accelerator.is_main_process:
            module.policy.causal_lm.save_pretrained(path, state_dict=policy_state)
            self.tokenizer.save_pretrained(path)
            value_dir = os.path.join(path, "value_model")
            module.value.seq_cls.save_pretrained(value_dir, state_dict=value_state)
            self.tokenizer.save_pretrained(value_dir)
