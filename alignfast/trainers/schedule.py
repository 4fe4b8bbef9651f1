"""AdamW with decoupled weight decay (none on biases and norms) and warmup + linear/cosine decay."""
from __future__ import annotations

import math

import torch


def make_optimizer(cfg, model: torch.nn.Module) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)


def lr_factor(step: int, *, kind: str, warmup: int, total: int) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def make_scheduler(cfg, optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = cfg.warmup_steps or int(math.ceil(cfg.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, kind=cfg.lr_scheduler, warmup=warmup, total=total_steps))
