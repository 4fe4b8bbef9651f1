"""Collators: examples of `encode.py` -> padded tensors, prompt and padding labels masked with -100.

Labels are the input ids (unshifted, as in Hugging Face): the loss shifts them by one. Padding is on
the right, so the last real token of row b is at `attention_mask[b].sum() - 1`.
"""
from __future__ import annotations

import torch

from alignfast.data.encode import truncate

IGNORE_INDEX = -100


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def encode_rows(prompts: list[list[int]], completions: list[list[int]], pad_token_id: int,
                completion_only: bool = True) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, labels [B, T] for prompt + completion rows."""
    ids = [p + c for p, c in zip(prompts, completions)]
    labels = [([IGNORE_INDEX] * len(p) if completion_only else list(p)) + c for p, c in zip(prompts, completions)]
    return {"input_ids": pad(ids, pad_token_id),
            "attention_mask": pad([[1] * len(r) for r in ids], 0),
            "labels": pad(labels, IGNORE_INDEX)}


class SFTCollator:
    """input_ids, attention_mask, labels (prompt masked unless completion_only=False)."""

    def __init__(self, pad_token_id: int, completion_only: bool = True):
        self.pad_token_id, self.completion_only = pad_token_id, completion_only

    def __call__(self, examples):
        return encode_rows([e["prompt_ids"] for e in examples], [e["completion_ids"] for e in examples],
                           self.pad_token_id, self.completion_only)


class PreferenceCollator:
    """Chosen and rejected stacked in one batch for one forward: rows [0, B) are the chosen
    sequences, rows [B, 2B) the rejected ones. Also `margin` [B] when every example has one, and
    any precomputed per-example float (e.g. `ref_chosen_logps`) as a [B] tensor."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples):
        prompts = [e["prompt_ids"] for e in examples]
        batch = encode_rows(prompts + prompts, [e["chosen_ids"] for e in examples]
                            + [e["rejected_ids"] for e in examples], self.pad_token_id)
        for key in ("margin", "ref_chosen_logps", "ref_rejected_logps"):
            if all(key in e for e in examples):
                batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
        return batch


class UnpairedCollator:
    """KTO batches: input_ids/attention_mask/labels, `label` [B] bool, and the mismatched pairs
    for the KL estimate, `kl_input_ids`/`kl_attention_mask`/`kl_labels`: prompt i with the
    completion of example i-1 (mod B), as TRL builds its KL dataset, or the example's own
    `kl_completion_ids` when it has one."""

    def __init__(self, pad_token_id: int, with_kl: bool = True, max_length: int | None = None):
        self.pad_token_id, self.with_kl, self.max_length = pad_token_id, with_kl, max_length

    def __call__(self, examples):
        prompts = [e["prompt_ids"] for e in examples]
        completions = [e["completion_ids"] for e in examples]
        batch = encode_rows(prompts, completions, self.pad_token_id)
        batch["label"] = torch.tensor([e["label"] for e in examples], dtype=torch.bool)
        if self.with_kl:
            if all("kl_completion_ids" in e for e in examples):  # fixed partners (KTOTrainer sets them)
                shifted = [e["kl_completion_ids"] for e in examples]
            else:
                shifted = completions[-1:] + completions[:-1]
            # prompt i with another completion: kept within max_length as every row is
            kl_rows = [truncate(p, c, self.max_length) for p, c in zip(prompts, shifted)]
            kl = encode_rows([p for p, _ in kl_rows], [c for _, c in kl_rows], self.pad_token_id)
            batch.update({f"kl_{k}": v for k, v in kl.items()})
        for key in ("ref_logps", "ref_kl_logps"):
            if all(key in e for e in examples):
                batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
        return batch


class RolloutCollator:
    """Rollout rows of the online stages (PPO, GRPO) -> a training batch.

    A row holds `prompt_ids`, `completion_ids`, per-token fields (1-D tensors over its completion
    tokens: old log-probs, advantages, ...) and per-sequence numbers. Per-token fields come out
    [B, T-1], aligned with the shifted targets the loss sees (0 on prompt and padding); sequence
    fields [B] fp32."""

    def __init__(self, pad_token_id: int, token_fields=(), sequence_fields=()):
        self.pad_token_id = pad_token_id
        self.token_fields, self.sequence_fields = tuple(token_fields), tuple(sequence_fields)

    def __call__(self, rows):
        prompts = [r["prompt_ids"] for r in rows]
        completions = [r["completion_ids"] for r in rows]
        batch = encode_rows(prompts, completions, self.pad_token_id)
        width = batch["input_ids"].shape[1] - 1
        for key in self.token_fields:
            out = torch.zeros(len(rows), width, dtype=torch.float32)
            for b, (p, c, row) in enumerate(zip(prompts, completions, rows)):
                out[b, len(p) - 1:len(p) - 1 + len(c)] = torch.as_tensor(row[key], dtype=torch.float32)
            batch[key] = out
        for key in self.sequence_fields:
            batch[key] = torch.tensor([float(r[key]) for r in rows], dtype=torch.float32)
        return batch
