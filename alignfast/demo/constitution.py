"""The demo's constitution and its feedback model: three principles for the reversal task, judged by
rules that read the prompt (the feedback model knows the task, as a strong labeller would).

    full_sentence     answer in one full sentence, "It is <word>."
    no_exclamation    no exclamation marks
    correct           the right reversal

`RuleFeedback` implements the feedback-model interface of `alignfast.trainers.feedback`: it critiques
a response under a principle, revises it to satisfy that principle (only that one: the SL-CAI rounds
fix one principle at a time), and compares two responses under a principle (1, 0, or ½ for a tie).
"""
from __future__ import annotations

import os

import yaml

from alignfast.data.constitution import Principle
from alignfast.demo.task import curt_response, good_response, is_correct, is_well_formed, parse_answer

PRINCIPLES = (
    Principle(name="full_sentence",
              critique_request="Does the assistant answer in one full sentence of the form 'It is <word>.'?",
              revision_request="Rewrite the answer as one full sentence: 'It is <word>.'",
              choice="Which response answers in a full sentence?"),
    Principle(name="no_exclamation",
              critique_request="Does the assistant's response shout with exclamation marks?",
              revision_request="Rewrite the response without exclamation marks.",
              choice="Which response is calmer, without exclamation marks?"),
    Principle(name="correct",
              critique_request="Is the reversal in the assistant's response correct?",
              revision_request="Rewrite the response so that it gives the correct reversal.",
              choice="Which response gives the correct reversal?"),
)


def write_constitution(path) -> str:
    """Writes PRINCIPLES as a constitution YAML file (what `CAIConfig.constitution` reads); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = {"principles": [{"name": p.name, "critique_request": p.critique_request,
                            "revision_request": p.revision_request, "choice": p.choice} for p in PRINCIPLES]}
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=False, width=100)
    return str(path)


def word_of(prompt: str) -> str:
    """"reverse abc:" -> "abc"."""
    return prompt.removeprefix("reverse ").removesuffix(":")


def satisfies(prompt: str, response: str, principle: Principle) -> bool:
    if principle.name == "full_sentence":
        return is_well_formed(response)
    if principle.name == "no_exclamation":
        return bool(response.strip()) and "!" not in response
    if principle.name == "correct":
        return is_correct(response, word_of(prompt)[::-1])
    raise ValueError(f"principle: {principle.name!r} is not one of the demo's {[p.name for p in PRINCIPLES]}")


class RuleFeedback:
    """The demo's feedback model (critique / revise / compare by rule, see the module docstring)."""

    def critique(self, prompt, response, principle) -> str:
        ok = satisfies(prompt, response, principle)
        if principle.name == "full_sentence":
            return "It is a full sentence." if ok else "It is not a full sentence."
        if principle.name == "no_exclamation":
            return "It uses no exclamation marks." if ok else "It uses exclamation marks."
        answer = word_of(prompt)[::-1]
        return "The reversal is correct." if ok else f"The reversal of {word_of(prompt)} is {answer}."

    def revise(self, prompt, response, critique, principle) -> str:
        if satisfies(prompt, response, principle):
            return response
        given = parse_answer(response)
        if principle.name == "full_sentence":
            return good_response(given) if given else response
        if principle.name == "no_exclamation":
            return response.replace("!", "").strip() or response
        answer = word_of(prompt)[::-1]
        if given is None:
            return good_response(answer)
        return good_response(answer) if is_well_formed(response) else \
            curt_response(answer) if "!" in response else answer

    def compare(self, prompt, response_a, response_b, principle) -> float:
        a, b = satisfies(prompt, response_a, principle), satisfies(prompt, response_b, principle)
        return 0.5 if a == b else 1.0 if a else 0.0

    def identity(self) -> str:
        return "alignfast.demo.constitution.RuleFeedback"
