"""Light stand-ins for the trainer state that TRL's loss code reads, so the tests can call TRL's own
loss methods unbound on the same log-probs as alignfast's functional losses (imported lazily: TRL's
import is slow)."""
from __future__ import annotations

import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch


def identity(x, *args, **kwargs):
    return x


def accelerator(device="cpu"):
    return SimpleNamespace(device=torch.device(device), gather=identity, gather_for_metrics=identity,
                           reduce=identity, num_processes=1)


def trainer(**attrs):
    """A `self` in eval mode (no token counting, no gradient-accumulation scaling) with metric buffers."""
    base = dict(model=SimpleNamespace(training=False), accelerator=accelerator(), aux_loss_enabled=False,
                _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0,
                _tp_size=1)
    base.update(attrs)
    return SimpleNamespace(**base)


def fake_lm(log_probs: torch.Tensor, **extra):
    """A model whose fused-LM-head forward returns the given per-token log-probs [N, T]."""
    n, t = log_probs.shape
    out = SimpleNamespace(log_probs=log_probs, entropy=torch.ones(n, t, dtype=log_probs.dtype),
                          mean_logits=torch.zeros(n, t, dtype=log_probs.dtype),
                          is_top1=torch.zeros(n, t, dtype=torch.bool), **extra)
    return lambda **kwargs: out


def import_trl(module: str, name: str):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # the CPO/ORPO trainers live in trl.experimental
    pytest.importorskip("trl")
    mod = __import__(module, fromlist=[name])
    return getattr(mod, name)
