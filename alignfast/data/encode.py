"""Records (TRL columns) -> token ids, with bad records reported by index and skipped or rejected.

Every example keeps the prompt and completion ids apart so the collators can mask the prompt:

    sft        {"prompt_ids", "completion_ids"}
    preference {"prompt_ids", "chosen_ids", "rejected_ids", "margin"?}
    unpaired   {"prompt_ids", "completion_ids", "label"}
    prompt     {"prompt_ids", "prompt", "columns"}   (the prompt as given, and the record's other columns)

Standard records: prompt = tokenizer(prompt) (with the tokenizer's BOS), completion =
tokenizer(completion) + EOS. Conversational records are rendered with the chat template; the
completion is what the full conversation adds after the prompt rendered with the generation prompt.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from alignfast.data.formats import BadRecord, check_record, is_conversational

logger = logging.getLogger(__name__)
ON_BAD_RECORD = ("skip", "error")


@dataclass
class PreparedDataset:
    examples: list[dict]
    bad: list[tuple[int, str]] = field(default_factory=list)  # (record index, what is wrong)

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def encode_pair(tokenizer, prompt, completion) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids) of one prompt/completion, standard or conversational."""
    if is_conversational(completion):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("conversational records need a tokenizer with a chat_template")
        prompt = prompt or []
        prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False) \
            if prompt else ""
        full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        if not full_text.startswith(prompt_text):
            raise BadRecord("the chat template renders the prompt differently inside the full conversation")
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False).input_ids
        completion_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False).input_ids
    else:
        prompt_ids = tokenizer(prompt).input_ids if prompt else (
            [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [])
        completion_ids = tokenizer(completion, add_special_tokens=False).input_ids
        if tokenizer.eos_token_id is not None:
            completion_ids = completion_ids + [tokenizer.eos_token_id]
    if not completion_ids:
        raise BadRecord("the completion encodes to no tokens")
    return prompt_ids, completion_ids


def truncate(prompt_ids: list[int], completion_ids: list[int], max_length: int | None):
    """Keeps prompt + completion within max_length: the completion's end is cut first, then the
    prompt's start, always keeping at least one completion token."""
    if max_length is None or len(prompt_ids) + len(completion_ids) <= max_length:
        return prompt_ids, completion_ids
    keep_prompt = min(len(prompt_ids), max_length - 1)
    prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt:]
    return prompt_ids, completion_ids[: max_length - keep_prompt]


def encode_prompt(tokenizer, prompt) -> list[int]:
    """Token ids of a prompt to generate from: a string with the tokenizer's BOS, or a conversation
    rendered with the chat template and its generation prompt."""
    if is_conversational(prompt):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("conversational records need a tokenizer with a chat_template")
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(prompt).input_ids


def encode_record(record: dict, kind: str, tokenizer, max_length: int | None = None) -> dict:
    check_record(record, kind)
    if kind == "prompt":  # generation needs room: a prompt keeps its last max_length // 2 tokens
        ids = encode_prompt(tokenizer, record["prompt"])
        keep = len(ids) if max_length is None else max(1, max_length // 2)
        return {"prompt_ids": ids[-keep:], "prompt": record["prompt"],
                "columns": {k: v for k, v in record.items() if k != "prompt"}}
    if kind == "sft" and "messages" in record:
        record = {"prompt": record["messages"][:-1], "completion": record["messages"][-1:]}
    if kind == "preference":
        p, c = truncate(*encode_pair(tokenizer, record["prompt"], record["chosen"]), max_length)
        p2, r = truncate(*encode_pair(tokenizer, record["prompt"], record["rejected"]), max_length)
        # both prompts are suffixes of the same ids (truncation keeps the end): share the shorter
        out = {"prompt_ids": p if len(p) <= len(p2) else p2, "chosen_ids": c, "rejected_ids": r}
        if "margin" in record:
            out["margin"] = float(record["margin"])
        return out
    p, c = truncate(*encode_pair(tokenizer, record["prompt"], record["completion"]), max_length)
    out = {"prompt_ids": p, "completion_ids": c}
    if kind == "unpaired":
        out["label"] = record["label"]
    return out


def prepare_dataset(records, kind: str, tokenizer, *, max_length: int | None = None,
                    on_bad_record: str = "error") -> PreparedDataset:
    """Checks and encodes every record. A malformed one (missing column, empty completion, wrong
    type) is reported with its index: `on_bad_record="error"` raises `ValueError` naming it,
    "skip" drops it with a warning (the list is in `.bad`)."""
    if on_bad_record not in ON_BAD_RECORD:
        raise ValueError(f"on_bad_record={on_bad_record!r}; choose one of {list(ON_BAD_RECORD)}")
    examples, bad = [], []
    for i, record in enumerate(records):
        try:
            examples.append(encode_record(record, kind, tokenizer, max_length))
        except BadRecord as e:
            if on_bad_record == "error":
                raise ValueError(f"malformed {kind} record #{i}: {e} (set on_bad_record=skip to drop it)") from e
            logger.warning("skipping malformed %s record #%d: %s", kind, i, e)
            bad.append((i, str(e)))
    if bad:
        logger.warning("skipped %d malformed record(s) of %d", len(bad), len(bad) + len(examples))
    if not examples:
        raise ValueError(f"no usable {kind} record in the dataset ({len(bad)} malformed)")
    return PreparedDataset(examples, bad)
