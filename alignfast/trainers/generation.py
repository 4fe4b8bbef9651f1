"""Sampling completions for the online stages (PPO, GRPO, CAI) with Hugging Face `generate`.

Generation needs the logits of one position per step ([B, V], KV cache on): that is the only place
the output head runs as a matmul. Sampling uses a private RNG seeded per call, so a resumed run
samples exactly what the uninterrupted one did, and the global RNG is left untouched.

Under FSDP2 the policy's parameters are gathered for the call (`_call_unsharded`): each process then
samples on its own, as an unsharded model would, at the memory cost of the whole policy.
"""
from __future__ import annotations

import functools
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


def _fsdp_modules(module) -> list:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed / FSDP2
        return []
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def _call_unsharded(prepared, causal_lm, fn):
    """fn() with the parameters of `causal_lm` gathered (full, plain tensors), `prepared` being the FSDP2
    root (`fully_shard`, what Accelerate prepared) that holds it.

    Why: `generate` calls the causal LM's submodules itself, outside the root's forward, whose
    pre-forward hook is what gathers the root group (embeddings, final norm, lm_head): those stay
    sharded DTensors and the first op fails ("mixed torch.Tensor and DTensor"). Gathering layer by layer
    in each decoding step would not do either: the processes stop sampling at different steps, so their
    all-gathers would not pair up. So fn runs as a forward of the root (`register_fsdp_forward_method`:
    FSDP's lazy init marks the root even before the first training forward, and its group is gathered);
    inside, every FSDP group of `causal_lm` is gathered once and kept (reshard_after_forward off) for
    the call, then resharded, the setting restored. No collective runs inside fn. Memory: the whole
    policy on every process for the duration (FSDP2's param dtype)."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    root = _fsdp_modules(prepared)[0]
    modules = [root] + [m for m in _fsdp_modules(causal_lm) if m is not root]

    def gathered():
        states = [m._get_fsdp_state() for m in modules]
        groups = [g for s in states for g in (s._fsdp_param_groups if hasattr(s, "_fsdp_param_groups")
                                              else [s._fsdp_param_group]) if g is not None]  # torch < 2.10
        saved = [g.post_forward_mesh_info for g in groups], [s._auto_reshard_after_forward for s in states]
        for m in modules:
            m.set_reshard_after_forward(False, recurse=False)
        try:
            for m in modules:
                m.unshard()
            return fn()
        finally:  # the setting each group had (the root's: keep after forward, FSDP2's own choice)
            for g, info in zip(groups, saved[0]):
                g.post_forward_mesh_info = info
            for s, auto in zip(states, saved[1]):
                s._auto_reshard_after_forward = auto

    name = "_alignfast_unsharded_call"
    setattr(root, name, gathered)
    register_fsdp_forward_method(root, name)
    try:
        return getattr(root, name)()
    finally:
        delattr(root, name)
        for m in modules:
            m.reshard()


@torch.no_grad()
def sample_completions(causal_lm, prompt_ids: list[list[int]], sampling: Sampling, *, eos_token_id: int | None,
                       pad_token_id: int, seed: int | None = None, batch_size: int | None = None,
                       prepared=None) -> list[list[int]]:
    """Completion ids of each prompt (no prompt), each cut after its first EOS (kept); a completion
    without EOS stopped at `max_new_tokens`. Prompts are left-padded in batches of `batch_size`.
    prepared: the module Accelerate prepared that holds `causal_lm` (e.g. the trainer's model): under
    FSDP2 its shards are gathered for the call (see `_call_unsharded`)."""
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("prompt_ids: every prompt needs at least one token")
    sampling.validate()
    run = functools.partial(_sample, causal_lm, prompt_ids, sampling, eos_token_id, pad_token_id, seed, batch_size)
    if prepared is None or not _fsdp_modules(prepared):
        return run(synced_gpus=None)  # transformers' default (ZeRO-3: the processes step together)
    # gathered: no collective inside, so transformers must not sync the processes' decoding steps
    return _call_unsharded(prepared, causal_lm, lambda: run(synced_gpus=False))


def _sample(causal_lm, prompt_ids, sampling, eos_token_id, pad_token_id, seed, batch_size, synced_gpus):
    from transformers import GenerationConfig

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
                generated = causal_lm.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                               synced_gpus=synced_gpus)
                out += [cut_at_eos(row, eos_token_id)[0] for row in generated[:, width:].tolist()]
    finally:
        hf_model.generation_config = model_defaults
        causal_lm.train(was_training)
    return out
