"""Thin trainers on `accelerate.Accelerator`, one file per stage."""
from alignfast.trainers.base import Trainer, TrainingStopped
from alignfast.trainers.checkpoint import CheckpointError
from alignfast.trainers.config import TrainConfig, load_config
from alignfast.trainers.dpo import DPOConfig, DPOTrainer
from alignfast.trainers.kto import KTOConfig, KTOTrainer
from alignfast.trainers.reward import RewardConfig, RewardTrainer
from alignfast.trainers.sft import SFTConfig, SFTTrainer

STAGES = {"sft": (SFTConfig, SFTTrainer), "reward": (RewardConfig, RewardTrainer),
          "dpo": (DPOConfig, DPOTrainer), "kto": (KTOConfig, KTOTrainer)}

__all__ = ["STAGES", "CheckpointError", "DPOConfig", "DPOTrainer", "KTOConfig", "KTOTrainer", "RewardConfig",
           "RewardTrainer", "SFTConfig", "SFTTrainer", "TrainConfig", "Trainer", "TrainingStopped", "load_config"]
