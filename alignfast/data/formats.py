"""TRL's column conventions, and the check of one record against them.

| kind       | columns                                               |
| ---------- | ----------------------------------------------------- |
| sft        | prompt + completion, or messages                      |
| preference | prompt + chosen + rejected (optional: margin)         |
| unpaired   | prompt + completion + label (bool: desirable or not)  |
| prompt     | prompt (online stages: PPO, GRPO, CAI; other columns  |
|            | are passed to reward functions as they are)           |

Each text column is either a string ("standard" format) or a list of {"role", "content"} messages
("conversational" format, rendered with the tokenizer's chat template; an assistant message may
carry "tool_calls" instead of content). An implicit prompt (a
preference record without `prompt` whose chosen/rejected are conversations sharing a prefix) is
not supported: give the prompt explicitly.
"""
from __future__ import annotations

KINDS = {
    "sft": (("prompt", "completion"), ("messages",)),
    "preference": (("prompt", "chosen", "rejected"),),
    "unpaired": (("prompt", "completion", "label"),),
    "prompt": (("prompt",),),
}
ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")


class BadRecord(ValueError):
    """A record that does not follow its kind's column conventions."""


def is_conversational(value) -> bool:
    return isinstance(value, list)


def _check_messages(name: str, value, *, require_nonempty: bool) -> None:
    if not isinstance(value, list):
        raise BadRecord(f"column {name!r} must be a list of messages, got {type(value).__name__}")
    if not value and require_nonempty:
        raise BadRecord(f"column {name!r} is an empty conversation")
    for i, m in enumerate(value):
        # an assistant message may carry tool calls instead of text
        content_ok = isinstance(m, dict) and (isinstance(m.get("content"), str) or (
            m.get("content") is None and m.get("role") == "assistant" and bool(m.get("tool_calls"))))
        if not content_ok or not isinstance(m.get("role"), str):
            raise BadRecord(f"column {name!r}: message {i} must be a dict with str 'role' and 'content' (or an "
                            f"assistant's 'tool_calls'), got {m!r:.80}")
        if m["role"] not in ROLES:
            raise BadRecord(f"column {name!r}: message {i} has unknown role {m['role']!r}")


def _check_text(name: str, value, *, allow_empty: bool) -> None:
    if isinstance(value, str):
        if not allow_empty and not value.strip():
            raise BadRecord(f"column {name!r} is empty")
    elif isinstance(value, list):
        _check_messages(name, value, require_nonempty=not allow_empty)
    else:
        raise BadRecord(f"column {name!r} must be a string or a list of messages, got {type(value).__name__}")


def check_record(record, kind: str) -> None:
    """Raises `BadRecord` saying what is wrong with `record` for `kind` ("sft", "preference", "unpaired")."""
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; choose one of {sorted(KINDS)}")
    if not isinstance(record, dict):
        raise BadRecord(f"a record must be a dict (a JSON object), got {type(record).__name__}")
    layouts = KINDS[kind]
    layout = next((cols for cols in layouts if all(c in record for c in cols)), None)
    if layout is None:
        wanted = " or ".join("/".join(cols) for cols in layouts)
        missing = [c for c in layouts[0] if c not in record]
        raise BadRecord(f"missing column(s) {missing} (a {kind} record needs {wanted}); it has {sorted(record)}")
    if layout == ("messages",):
        _check_messages("messages", record["messages"], require_nonempty=True)
        if not isinstance(record["messages"], list) or record["messages"][-1]["role"] != "assistant":
            raise BadRecord("column 'messages' must end with an assistant message (the completion)")
        return
    _check_text("prompt", record["prompt"], allow_empty=kind != "prompt")
    for col in layout[1:]:
        if col == "label":
            if not isinstance(record["label"], bool):
                raise BadRecord(f"column 'label' must be a bool, got {record['label']!r}")
            continue
        _check_text(col, record[col], allow_empty=False)
        if is_conversational(record[col]) != is_conversational(record["prompt"]) and record["prompt"]:
            raise BadRecord(f"columns 'prompt' and {col!r} mix the standard and conversational formats")
    if kind == "preference" and "margin" in record and not isinstance(record["margin"], (int, float)):
        raise BadRecord(f"column 'margin' must be a number, got {record['margin']!r}")
