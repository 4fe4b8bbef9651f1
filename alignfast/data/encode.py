"""Records (TRL columns) -> token ids, with bad records reported by index and skipped or rejected.

Every example keeps the prompt and completion ids apart so the collators can mask the prompt:

    sft        {"prompt_ids", "completion_ids"}
    preference {"prompt_ids", "chosen_ids", "rejected_ids", "margin"?}
    unpaired   {"prompt_ids", "completion_ids", "label"}
    prompt     {"prompt_ids", "prompt", "columns"}   (the prompt as given, and the record's other columns)

As TRL 1.16 does: the prompt and prompt + completion are tokenized separately, and the completion is
where the two token sequences diverge (tokens can merge across the boundary: a SentencePiece tokenizer
encodes a completion alone with a leading "▁" that the text does not have). Standard records are
tokenized with the tokenizer's special tokens, plus EOS unless the sequence already ends with it;
conversational ones are rendered with the chat template (the prompt with the generation prompt; a
record's `tools` and `chat_template_kwargs` columns go to the template, as in TRL).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import jinja2

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


def template_kwargs(record: dict) -> dict:
    """What a record gives the chat template besides its messages: `tools` (a list, or its JSON) and
    `chat_template_kwargs`."""
    tools = record.get("tools")
    kwargs = {"tools": json.loads(tools) if isinstance(tools, str) else tools} if tools is not None else {}
    extra = record.get("chat_template_kwargs") or {}
    if not isinstance(extra, dict):
        raise BadRecord(f"column 'chat_template_kwargs' must be a mapping, got {type(extra).__name__}")
    return {**kwargs, **extra}


def render(tokenizer, messages, **kwargs) -> str:
    """The chat template's text of `messages`; a template that refuses them (e.g. roles that must
    alternate) makes a bad record, not a crash."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("conversational records need a tokenizer with a chat_template")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except jinja2.TemplateError as e:
        raise BadRecord(f"the chat template refused it: {e}") from None


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_pair(tokenizer, prompt, completion, **template) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids) of one prompt/completion, standard or conversational: the
    completion is where the tokens of the prompt and of prompt + completion diverge."""
    if is_conversational(completion):
        prompt = prompt or []
        prompt_text = render(tokenizer, prompt, add_generation_prompt=True, **template) if prompt else ""
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False).input_ids
        full_ids = tokenizer(render(tokenizer, prompt + completion, **template), add_special_tokens=False).input_ids
    else:
        prompt_ids = tokenizer(prompt or "").input_ids
        full_ids = tokenizer((prompt or "") + completion).input_ids
        eos = tokenizer.eos_token_id
        if eos is not None and (not full_ids or full_ids[-1] != eos):
            full_ids = full_ids + [eos]
    split = common_prefix_length(prompt_ids, full_ids)
    if split == len(full_ids):
        raise BadRecord("the completion encodes to no tokens")
    return full_ids[:split], full_ids[split:]


def truncate(prompt_ids: list[int], completion_ids: list[int], max_length: int | None):
    """Keeps prompt + completion within max_length: the completion's end is cut first, then the
    prompt's start, always keeping at least one completion token."""
    if max_length is None or len(prompt_ids) + len(completion_ids) <= max_length:
        return prompt_ids, completion_ids
    keep_prompt = min(len(prompt_ids), max_length - 1)
    prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt:]
    return prompt_ids, completion_ids[: max_length - keep_prompt]


def encode_prompt(tokenizer, prompt, **template) -> list[int]:
    """Token ids of a prompt to generate from: a string with the tokenizer's BOS, or a conversation
    rendered with the chat template and its generation prompt."""
    if is_conversational(prompt):
        text = render(tokenizer, prompt, add_generation_prompt=True, **template)
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(prompt).input_ids


def encode_record(record: dict, kind: str, tokenizer, max_length: int | None = None) -> dict:
    check_record(record, kind)
    template = template_kwargs(record)
    if kind == "prompt":  # generation needs room: a prompt keeps its last max_length // 2 tokens
        ids = encode_prompt(tokenizer, record["prompt"], **template)
        keep = len(ids) if max_length is None else max(1, max_length // 2)
        return {"prompt_ids": ids[-keep:], "prompt": record["prompt"], "truncated": len(ids) > keep,
                "columns": {k: v for k, v in record.items() if k != "prompt"}}
    if kind == "sft" and "messages" in record:
        record = {"prompt": record["messages"][:-1], "completion": record["messages"][-1:]}
    if kind == "preference":
        p, c = encode_pair(tokenizer, record["prompt"], record["chosen"], **template)
        p2, r = encode_pair(tokenizer, record["prompt"], record["rejected"], **template)
        # one prompt for both: the shorter of the two splits, each a prefix of the same prompt tokens
        shared = min(len(p), len(p2))
        c, r = p[shared:] + c, p2[shared:] + r
        p, c = truncate(p[:shared], c, max_length)
        _, r = truncate(p2[:shared], r, max_length)  # the same prompt cut: it depends on its length only
        if c == r:
            within = "" if max_length is None else f" within max_length={max_length}"
            raise BadRecord(f"chosen and rejected are the same tokens{within}: the pair carries no preference")
        out = {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
        if "margin" in record:
            out["margin"] = float(record["margin"])
        return out
    p, c = truncate(*encode_pair(tokenizer, record["prompt"], record["completion"], **template), max_length)
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
    truncated = 0
    for i, record in enumerate(records):
        try:
            example = encode_record(record, kind, tokenizer, max_length)
            truncated += example.pop("truncated", False)
            examples.append(example)
        except BadRecord as e:
            if on_bad_record == "error":
                raise ValueError(f"malformed {kind} record #{i}: {e} (set on_bad_record=skip to drop it)") from e
            logger.warning("skipping malformed %s record #%d: %s", kind, i, e)
            bad.append((i, str(e)))
    if bad:
        logger.warning("skipped %d malformed record(s) of %d", len(bad), len(bad) + len(examples))
    if truncated:
        logger.warning("%d of %d prompts are longer than max_length // 2 = %d tokens (the room left for "
                       "generation) and keep only their last tokens; raise max_length to keep them whole",
                       truncated, len(examples), max_length // 2)
    if not examples:
        raise ValueError(f"no usable {kind} record in the dataset ({len(bad)} malformed)")
    return PreparedDataset(examples, bad)
