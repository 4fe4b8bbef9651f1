"""The constitution of Constitutional AI: natural-language principles, loaded from YAML.

    principles:
      - name: harmful
        critique_request: Identify specific ways in which the assistant's last response is harmful ...
        revision_request: Please rewrite the assistant response to remove ...
        choice: Which of these assistant responses is less harmful? ...

`default_constitution()` is the file shipped beside this module (constitution.yaml).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

DEFAULT_PATH = Path(__file__).with_name("constitution.yaml")


@dataclass(frozen=True)
class Principle:
    name: str
    critique_request: str  # SL-CAI: asks for a critique of the assistant's last response
    revision_request: str  # SL-CAI: asks for a rewrite that addresses the critique
    choice: str  # RL-CAI: the multiple-choice question "which response is better ...?"


KEYS = tuple(f.name for f in fields(Principle))


def load_constitution(path=None) -> tuple[Principle, ...]:
    """The principles of the YAML file at `path` (default: the shipped constitution). A missing file,
    invalid YAML, a missing/unknown/empty key or a duplicate name is a ValueError naming it."""
    path = Path(path) if path is not None else DEFAULT_PATH
    if not path.is_file():
        raise ValueError(f"constitution: file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"constitution: {str(path)!r} is not valid YAML ({e})") from None
    if not isinstance(data, dict) or set(data) != {"principles"}:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"constitution: {str(path)!r} must be a mapping with the single key 'principles', "
                         f"found {found}")
    items = data["principles"]
    if not isinstance(items, list) or not items:
        raise ValueError(f"constitution: 'principles' in {str(path)!r} must be a non-empty list")
    principles, seen = [], set()
    for i, item in enumerate(items):
        where = f"principle #{i}" + (f" ({item['name']!r})" if isinstance(item, dict) and "name" in item else "")
        if not isinstance(item, dict):
            raise ValueError(f"constitution: {where} must be a mapping of {list(KEYS)}")
        missing, unknown = [k for k in KEYS if k not in item], sorted(set(item) - set(KEYS))
        if missing or unknown:
            raise ValueError(f"constitution: {where} has missing key(s) {missing} / unknown key(s) {unknown}; "
                             f"a principle has exactly {list(KEYS)}")
        for key in KEYS:
            if not isinstance(item[key], str) or not item[key].strip():
                raise ValueError(f"constitution: {where}: {key!r} must be a non-empty string, got {item[key]!r}")
        if item["name"] in seen:
            raise ValueError(f"constitution: {where}: the name {item['name']!r} is used twice")
        seen.add(item["name"])
        principles.append(Principle(**{k: " ".join(item[k].split()) for k in KEYS}))
    return tuple(principles)


def default_constitution() -> tuple[Principle, ...]:
    return load_constitution(DEFAULT_PATH)


def constitution_digest(path=None) -> str:
    """sha256 of the constitution file's bytes: a run's generated data depends on its content."""
    return hashlib.sha256((Path(path) if path is not None else DEFAULT_PATH).read_bytes()).hexdigest()[:16]
