"""Sampling completions for the online stages (PPO, GRPO, CAI) with Hugging Face `generate`.

Generation needs the logits of one position per step ([B, V], KV cache on): that is the only place
the output head runs as a matmul. Sampling uses a private RNG seeded per call, so a resumed run
samples exactly what the uninterrupted one did, and the global RNG is left untouched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 32
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: no top-k filtering
    top_p: float = 1.0

    def validate(self) -> "Sampling":
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        return self


def cut_at_eos(ids: list[int], eos_token_id: int | None) -> tuple[list[int], bool]:
    """(ids up to and including the first EOS, whether there was one)."""
    if eos_token_id is not None and eos_token_id in ids:
        return ids[:ids.index(eos_token_id) + 1], True
    return ids, False


@torch.no_grad()
def sample_completions(causal_lm, prompt_ids: list[list[int]], sampling: Sampling, *, eos_token_id: int | None,
                       pad_token_id: int, seed: int | None = None, batch_size: int | None = None) -> list[list[int]]:
    """Completion ids of each prompt (no prompt), each cut after its first EOS (kept); a completion
    without EOS stopped at `max_new_tokens`. Prompts are left-padded in batches of `batch_size`."""
    from transformers import GenerationConfig

    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("prompt_ids: every prompt needs at least one token")
    sampling.validate()
    device = next(causal_lm.parameters()).device
    greedy = sampling.temperature == 0
    config = GenerationConfig(max_new_tokens=sampling.max_new_tokens, do_sample=not greedy,
                              eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                              temperature=None if greedy else sampling.temperature,
                              top_k=None if greedy else sampling.top_k, top_p=None if greedy else sampling.top_p)
    was_training = causal_lm.training
    causal_lm.eval()
    # `generate` fills every option left unset from the checkpoint's generation_config.json
    # (repetition_penalty, min_new_tokens, num_beams, ...): that would sample from another distribution
    # than the tempered one the losses' log-probs assume. Neutral defaults for the call.
    hf_model = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm  # PEFT
    model_defaults, hf_model.generation_config = hf_model.generation_config, GenerationConfig()
    out: list[list[int]] = []
    size = batch_size or len(prompt_ids)
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(prompt_ids), size):
                rows = prompt_ids[start:start + size]
                width = max(len(r) for r in rows)
                ids = torch.tensor([[pad_token_id] * (width - len(r)) + r for r in rows], device=device)
                mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
                generated = causal_lm.generate(input_ids=ids, attention_mask=mask, generation_config=config)
                out += [cut_at_eos(row, eos_token_id)[0] for row in generated[:, width:].tolist()]
    finally:
        hf_model.generation_config = model_defaults
        causal_lm.train(was_training)
    return out
