"""Built-in toy datasets: small-integer arithmetic, learnable in a few dozen steps by a tiny model.

    sft_records(n)         {"prompt": "12+7=", "completion": "19"}
    preference_records(n)  {"prompt": "12+7=", "chosen": "19", "rejected": "18"}
    unpaired_records(n)    {"prompt": "12+7=", "completion": "19" | "24", "label": True | False}
    style_preference_records(n)
                           {"prompt": "12+7=", "chosen": "It is 19.", "rejected": "18!!"}: a preference a
                           tiny model learns in seconds and that carries over to unseen prompts
                           (the end-to-end SFT -> DPO test holds out problems of another seed)

`conversational=True` wraps prompts and completions as chat messages instead.
"""
from __future__ import annotations

import random


def _problem(rng: random.Random, max_operand: int) -> tuple[str, int]:
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    op = rng.choice("+-")
    return f"{a}{op}{b}=", a + b if op == "+" else a - b


def _wrong(rng: random.Random, answer: int) -> int:
    return answer + rng.choice([-3, -2, -1, 1, 2, 3, 10])


def _as_chat(prompt: str, completion: str | None = None):
    p = [{"role": "user", "content": prompt}]
    return p if completion is None else (p, [{"role": "assistant", "content": completion}])


def sft_records(n: int, *, seed: int = 0, max_operand: int = 20, conversational: bool = False) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt, answer = _problem(rng, max_operand)
        if conversational:
            out.append({"messages": _as_chat(prompt)[:1] + [{"role": "assistant", "content": str(answer)}]})
        else:
            out.append({"prompt": prompt, "completion": str(answer)})
    return out


def preference_records(n: int, *, seed: int = 0, max_operand: int = 20, conversational: bool = False) -> list[dict]:
    """Pairs where the chosen completion is the right answer and the rejected one is wrong."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt, answer = _problem(rng, max_operand)
        chosen, rejected = str(answer), str(_wrong(rng, answer))
        if conversational:
            p, c = _as_chat(prompt, chosen)
            out.append({"prompt": p, "chosen": c, "rejected": _as_chat(prompt, rejected)[1]})
        else:
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def style_preference_records(n: int, *, seed: int = 0, max_operand: int = 20) -> list[dict]:
    """Pairs where the chosen completion is the right answer in a full sentence and the rejected one a
    wrong answer, curtly. Unlike `preference_records` (where telling the pair apart needs arithmetic
    the tiny model does not learn in a test's time), the preference generalises to held-out prompts."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt, answer = _problem(rng, max_operand)
        out.append({"prompt": prompt, "chosen": f"It is {answer}.", "rejected": f"{_wrong(rng, answer)}!!"})
    return out


def unpaired_records(n: int, *, seed: int = 0, max_operand: int = 20, desirable_fraction: float = 0.5,
                     conversational: bool = False) -> list[dict]:
    """Single completions labelled desirable (right answer) or undesirable (wrong answer)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt, answer = _problem(rng, max_operand)
        good = rng.random() < desirable_fraction
        completion = str(answer if good else _wrong(rng, answer))
        if conversational:
            p, c = _as_chat(prompt, completion)
            out.append({"prompt": p, "completion": c, "label": good})
        else:
            out.append({"prompt": prompt, "completion": completion, "label": good})
    return out


RECORDS = {"sft": sft_records, "preference": preference_records, "unpaired": unpaired_records}
