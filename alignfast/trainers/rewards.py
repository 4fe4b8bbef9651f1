"""Where the online stages' rewards come from: Python reward functions and reward models.

A reward function is called like TRL's: `fn(prompts, completions, **columns) -> list[float]`, with
the prompts as the dataset gives them (text or messages), the decoded completions, and every other
column of the prompt dataset as a list (e.g. `answer` for a verifiable task). A reward model is a
sequence-classification model with one label (what `RewardTrainer` saves); it scores
prompt + completion ids, so it must share the policy's tokenizer. The reward is the weighted sum
of all sources.
"""
from __future__ import annotations

import importlib

import torch


def import_function(spec: str):
    """`package.module:function` -> the function."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"reward_funcs: {spec!r} is not of the form package.module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward_funcs: cannot import {spec!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"reward_funcs: {spec!r} is not callable")
    return fn


def source_name(source) -> str:
    return getattr(source, "__name__", None) or type(source).__name__


class Rewards:
    """Scores completions with `sources` (callables and/or `ScalarHeadModel`s), weighted."""

    def __init__(self, sources: list, weights: list[float] | None, tokenizer, pad_token_id: int, batch_size: int = 16):
        if not sources:
            raise ValueError("reward_funcs / reward_model: an online stage needs at least one reward source")
        weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
        if len(weights) != len(sources):
            raise ValueError(f"reward_weights: {len(weights)} weight(s) for {len(sources)} reward source(s)")
        self.sources, self.weights = list(sources), weights
        self.tokenizer, self.pad_token_id, self.batch_size = tokenizer, pad_token_id, batch_size
        names = [source_name(s) for s in self.sources]
        self.names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]

    @torch.no_grad()
    def __call__(self, examples: list[dict], completion_ids: list[list[int]]):
        """(total reward [n] fp32, {source name: reward [n]}) of each example's completion."""
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        prompts = [e["prompt"] for e in examples]
        columns = {k: [e["columns"].get(k) for e in examples] for k in examples[0]["columns"]} if examples else {}
        per_source = {}
        for name, source in zip(self.names, self.sources):
            if isinstance(source, torch.nn.Module):
                values = self._score_model(source, examples, completion_ids)
            else:
                out = source(prompts, texts, **columns)
                try:  # a scalar, None (TRL's "unscorable") or text would fail below without naming the function
                    values = torch.as_tensor([float(v) for v in out], dtype=torch.float32)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"reward function {name} must return one float per completion: {e}") from None
                if values.shape != (len(texts),):
                    raise ValueError(f"reward function {name} returned {values.numel()} values for {len(texts)} "
                                     f"completions")
            if not torch.isfinite(values).all():
                raise ValueError(f"reward source {name} returned a non-finite reward")
            per_source[name] = values.float().cpu()
        total = sum(w * per_source[n] for w, n in zip(self.weights, self.names))
        return total, per_source

    def _score_model(self, model, examples, completion_ids) -> torch.Tensor:
        from alignfast.data.collators import encode_rows

        device = next(model.parameters()).device
        out = []
        for i in range(0, len(examples), self.batch_size):
            batch = encode_rows([e["prompt_ids"] for e in examples[i:i + self.batch_size]],
                                completion_ids[i:i + self.batch_size], self.pad_token_id)
            out.append(model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu())
        return torch.cat(out)

