"""The demo's synthetic task: reverse a short word, answer in a full sentence.

    prompt        "reverse hbdf:"
    good answer   "It is fdbh."        the correct reversal, in a full sentence, no exclamation marks
    curt answer   "fdbh!!"             what most of the SFT demonstrations look like

Words are 3-6 letters from a-j, so there are ~1.1 million of them and the held-out prompts are words
never trained on: a model has to learn the reversal, not memorise it. A tiny char-level Llama learns
it in a few hundred SFT steps, imperfectly at first: its greedy answers are mostly right, its
samples (temperature 1) less often and mostly curtly, which leaves room for RL. The reward is
verifiable (`task_reward`): the answer is parsed from the completion and checked against the
prompt's `answer` column, and the full sentence earns the rest.

Records for every data kind of the trainers (TRL's column conventions):

    sft_records          {"prompt", "completion"}           completion: good (`good_fraction`) or curt
    preference_records   {"prompt", "chosen", "rejected"}   chosen: good; rejected: corrupted (wrong
                                                            answer, curt form, or both)
    unpaired_records     {"prompt", "completion", "label"}  good (True) or corrupted (False), half each
    prompt_records       {"prompt", "answer"}               for PPO, GRPO and CAI; `answer` reaches the
                                                            reward functions as a column
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

ALPHABET = "abcdefghij"
MIN_LEN, MAX_LEN = 3, 6
ANSWER = re.compile(r"(?:It is )?([a-z]+)(?:\.|!*)")  # a well-formed or curt answer; anything else: none
GOOD = re.compile(r"It is ([a-z]+)\.")


@dataclass(frozen=True)
class Problem:
    word: str

    @property
    def prompt(self) -> str:
        return f"reverse {self.word}:"

    @property
    def answer(self) -> str:
        return self.word[::-1]


def good_response(answer: str) -> str:
    return f"It is {answer}."


def curt_response(answer: str) -> str:
    return f"{answer}!!"


def parse_answer(text: str) -> str | None:
    """The answer a completion gives ("It is abc." or "abc!!" -> "abc"), None when it gives none."""
    m = ANSWER.fullmatch(text.strip())
    return m.group(1) if m else None


def is_correct(text: str, answer: str) -> bool:
    return parse_answer(text) == answer


def is_well_formed(text: str) -> bool:
    """A full sentence "It is <word>." (which has no exclamation mark)."""
    return GOOD.fullmatch(text.strip()) is not None


# ---- the verifiable reward (called like TRL's: fn(prompts, completions, **columns) -> list[float]) ----
def task_reward(prompts, completions, answer, **_) -> list[float]:
    """1 for the right reversal in a full sentence, 0.5 for the right reversal in another form, else 0."""
    return [0.0 if not is_correct(c, a) else 1.0 if is_well_formed(c) else 0.5 for c, a in zip(completions, answer)]


# ---- problems -------------------------------------------------------------------------------------
def split_problems(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """(training problems, held-out problems): distinct words, none of the held-out ones in training."""
    rng = random.Random(f"reverse-{seed}")
    seen, words = set(), []
    while len(words) < n_train + n_eval:
        w = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))
        if w not in seen:
            seen.add(w)
            words.append(w)
    problems = [Problem(w) for w in words]
    return problems[n_eval:], problems[:n_eval]


def corrupt_answer(answer: str, rng: random.Random) -> str:
    """A wrong answer close to the right one: two letters swapped, one changed, one dropped, or the word
    not reversed at all."""
    for _ in range(20):
        kind = rng.choice(("swap", "change", "drop", "unreversed"))
        chars = list(answer)
        if kind == "swap":
            i = rng.randrange(len(chars) - 1)
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
        elif kind == "change":
            i = rng.randrange(len(chars))
            chars[i] = rng.choice(ALPHABET.replace(chars[i], ""))
        elif kind == "drop":
            del chars[rng.randrange(len(chars))]
        else:
            chars.reverse()
        wrong = "".join(chars)
        if wrong != answer:
            return wrong
    return answer + rng.choice(ALPHABET)  # e.g. "aaa": only a change in length is wrong for sure


def corrupted_response(answer: str, rng: random.Random) -> str:
    """A bad response: a wrong answer in a full sentence, the right answer curtly, or a wrong one curtly."""
    kind = rng.choice(("wrong", "curt", "wrong_curt"))
    if kind == "curt":
        return curt_response(answer)
    wrong = corrupt_answer(answer, rng)
    return good_response(wrong) if kind == "wrong" else curt_response(wrong)


# ---- records ---------------------------------------------------------------------------------------
def sft_records(problems: list[Problem], *, seed: int = 0, good_fraction: float = 0.3) -> list[dict]:
    """Demonstrations with the right answers, only `good_fraction` of them in the preferred form."""
    rng = random.Random(f"sft-{seed}")
    return [{"prompt": p.prompt, "completion": good_response(p.answer) if rng.random() < good_fraction
             else curt_response(p.answer)} for p in problems]


def preference_records(problems: list[Problem], *, seed: int = 0) -> list[dict]:
    rng = random.Random(f"preference-{seed}")
    return [{"prompt": p.prompt, "chosen": good_response(p.answer), "rejected": corrupted_response(p.answer, rng)}
            for p in problems]


def unpaired_records(problems: list[Problem], *, seed: int = 0) -> list[dict]:
    rng = random.Random(f"unpaired-{seed}")
    out = []
    for p in problems:
        good = rng.random() < 0.5
        out.append({"prompt": p.prompt, "completion": good_response(p.answer) if good
                    else corrupted_response(p.answer, rng), "label": good})
    return out


def prompt_records(problems: list[Problem]) -> list[dict]:
    return [{"prompt": p.prompt, "answer": p.answer} for p in problems]
