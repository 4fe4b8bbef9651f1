"""Thin trainers on `accelerate.Accelerator`, one file per stage."""
from alignfast.trainers.base import Trainer, TrainingStopped
from alignfast.trainers.cai import CAIConfig, CAITrainer
from alignfast.trainers.checkpoint import CheckpointError
from alignfast.trainers.config import TrainConfig, load_config
from alignfast.trainers.dpo import DPOConfig, DPOTrainer
from alignfast.trainers.grpo import GRPOConfig, GRPOTrainer
from alignfast.trainers.kto import KTOConfig, KTOTrainer
from alignfast.trainers.online import OnlineConfig, OnlineTrainer
from alignfast.trainers.ppo import PPOConfig, PPOTrainer
from alignfast.trainers.reward import RewardConfig, RewardTrainer
from alignfast.trainers.sft import SFTConfig, SFTTrainer

STAGES = {"sft": (SFTConfig, SFTTrainer), "reward": (RewardConfig, RewardTrainer),
          "dpo": (DPOConfig, DPOTrainer), "kto": (KTOConfig, KTOTrainer),
          "ppo": (PPOConfig, PPOTrainer), "grpo": (GRPOConfig, GRPOTrainer), "cai": (CAIConfig, CAITrainer)}

__all__ = ["STAGES", "CAIConfig", "CAITrainer", "CheckpointError", "DPOConfig", "DPOTrainer", "GRPOConfig",
           "GRPOTrainer", "KTOConfig", "KTOTrainer", "OnlineConfig", "OnlineTrainer", "PPOConfig", "PPOTrainer",
           "RewardConfig", "RewardTrainer", "SFTConfig", "SFTTrainer", "TrainConfig", "Trainer", "TrainingStopped",
           "load_config"]
