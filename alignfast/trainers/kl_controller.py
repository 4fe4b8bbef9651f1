"""β, the weight of PPO's KL penalty: fixed, or adapted towards a target KL.

Adaptive (Ziegler et al., "Fine-Tuning Language Models from Human Preferences", 2019, §2.2,
https://arxiv.org/abs/1909.08593), after each rollout whose mean sequence KL(π‖π_ref) is KL:

    e = clip(KL / KL_target − 1, −0.2, 0.2)
    β ← β · (1 + e · n / horizon)            n: the rollout's sequences (episodes)

A proportional controller: β grows while the policy drifts further than the target, shrinks while
it stays closer, at most by a factor 1 ± 0.2·n/horizon per rollout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

ERROR_CLIP = 0.2


@dataclass
class KLController:
    value: float                 # β
    target: float | None = None  # KL_target (nats per sequence); None: β is fixed
    horizon: float = 10000.0

    def update(self, kl: float, n_steps: int) -> float:
        """Adapts β to the rollout's mean sequence KL (a non-finite KL leaves it as is); returns β."""
        if self.target is not None and math.isfinite(kl):
            error = min(max(kl / self.target - 1.0, -ERROR_CLIP), ERROR_CLIP)
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value
