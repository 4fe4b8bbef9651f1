"""Thin trainers on `accelerate.Accelerator`, one file per stage."""
from alignfast.trainers.base import Trainer, TrainingStopped
from alignfast.trainers.checkpoint import CheckpointError
from alignfast.trainers.config import TrainConfig, load_config
from alignfast.trainers.sft import SFTConfig, SFTTrainer

STAGES = {"sft": (SFTConfig, SFTTrainer)}

__all__ = ["STAGES", "CheckpointError", "SFTConfig", "SFTTrainer", "TrainConfig", "Trainer", "TrainingStopped",
           "load_config"]
