"""Alignment losses.

Functional losses on [B] / [B, T] tensors (pure PyTorch, one method per file; each returns the
loss and the metrics its method's users log):

    kl.py          token_kl                               k1 / k2 / k3 KL estimators
    gae.py         gae                                    GAE advantages and returns (torch or Triton)
    pg_token.py    pg_token_terms                         PPO/GRPO per-token loss, ∂/∂logp, metric terms
                                                          in one pass (torch, Triton, C++ or CUDA)
    ppo.py         ppo_policy_loss, ppo_value_loss        clipped surrogate (+ dual clip), clipped value loss
    grpo.py        grpo_loss                              GRPO / BNPO / Dr. GRPO / DAPO
    dpo.py         dpo_loss                               DPO and its variants (a registry of loss types)
    preference.py  simpo_loss, orpo_loss, cpo_loss        reference-free preference losses
    kto.py         kto_loss, kto_kl_estimate              KTO
    reward.py      reward_loss                            Bradley-Terry reward-model loss

Fused `Linear*Loss` modules (hidden states + lm_head weight in, no logits) live in their own
files and are exported in the second block below.
"""
from alignfast.losses.dpo import DPO_LOSSES, dpo_loss
from alignfast.losses.gae import gae
from alignfast.losses.grpo import grpo_loss
from alignfast.losses.kl import token_kl
from alignfast.losses.kto import kto_kl_estimate, kto_loss
from alignfast.losses.ppo import ppo_policy_loss, ppo_value_loss
from alignfast.losses.preference import cpo_loss, orpo_loss, simpo_loss
from alignfast.losses.reward import reward_loss

__all__ = [
    "DPO_LOSSES",
    "cpo_loss",
    "dpo_loss",
    "gae",
    "grpo_loss",
    "kto_kl_estimate",
    "kto_loss",
    "orpo_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "reward_loss",
    "simpo_loss",
    "token_kl",
]

# --- fused modules (one import line and one __all__ entry per file) ---------------------------
from alignfast.losses.fused_base import LinearLossBase, SequenceBatch  # noqa: E402
from alignfast.losses.fused_kto import LinearKTOLoss  # noqa: E402
from alignfast.losses.fused_preference import (LinearCPOLoss, LinearDPOLoss, LinearORPOLoss,  # noqa: E402
                                               LinearPreferenceLoss, LinearSimPOLoss)
from alignfast.losses.fused_rl import LinearGRPOLoss, LinearPPOLoss  # noqa: E402
from alignfast.losses.fused_sft import LinearSFTLoss  # noqa: E402

__all__ += ["LinearCPOLoss", "LinearDPOLoss", "LinearGRPOLoss", "LinearKTOLoss", "LinearLossBase", "LinearORPOLoss",
            "LinearPPOLoss", "LinearPreferenceLoss", "LinearSFTLoss", "LinearSimPOLoss", "SequenceBatch"]
