"""Feedback models of Constitutional AI: critique a response, revise it, choose the better of two.

Any object with these methods is a feedback model (`principle` is an `alignfast.data.constitution.Principle`;
`prompt` is a string or a list of chat messages, as in the dataset):

    critique(prompt, response, principle) -> str
    revise(prompt, response, critique, principle) -> str
    compare(prompt, response_a, response_b, principle) -> float     P(response_a is the better one)

It may add `critique_batch`, `revise_batch`, `compare_batch` (lists of argument tuples -> lists), which
the trainer prefers (`LMFeedback` batches its generation and scoring this way).

`LMFeedback` asks a causal LM with the prompt formats of Bai et al. 2022: it *generates* critiques
and revisions, and *scores* a comparison as a multiple-choice question, P(A) = softmax over the
log-probs of the continuations " (A)" and " (B)" — computed by the fused `sequence_logps` on the
backbone's hidden states, never from logits. `CallableFeedback` turns plain Python functions into one.
"""
from __future__ import annotations

import math

import torch

from alignfast.data.collators import encode_rows
from alignfast.data.formats import is_conversational
from alignfast.trainers.generation import Sampling, sample_completions
from alignfast.trainers.modeling import HiddenStatesModel
from alignfast.trainers.sequence import sequence_logps

CHOICES = (" (A)", " (B)")
ROLE_NAMES = {"user": "Human", "assistant": "Assistant", "system": "System"}
# A generated critique/revision ends where the model starts the next section of the dialogue.
STOP_MARKERS = ("\nHuman:", "\nAssistant:", "\nCritique Request:", "\nCritique:", "\nRevision Request:",
                "\nRevision:")


# ---- prompt formats (Bai et al. 2022, appendices C and E) ----------------------------------------
def render_dialogue(prompt) -> str:
    """"Human: ..." for a string prompt; "Role: content" turns for a conversation."""
    if is_conversational(prompt):
        return "\n\n".join(f"{ROLE_NAMES.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in prompt)
    return f"Human: {prompt}"


def critique_prompt(prompt, response: str, principle) -> str:
    return (f"{render_dialogue(prompt)}\n\nAssistant: {response}\n\n"
            f"Critique Request: {principle.critique_request}\n\nCritique:")


def revision_prompt(prompt, response: str, critique: str, principle) -> str:
    return (f"{critique_prompt(prompt, response, principle)} {critique}\n\n"
            f"Revision Request: {principle.revision_request}\n\nRevision:")


def comparison_prompt(prompt, response_a: str, response_b: str, principle) -> str:
    """The context whose continuation is " (A)" or " (B)"."""
    return ("Consider the following conversation between a human and an assistant:\n"
            f"{render_dialogue(prompt)}\n{principle.choice}\nOptions:\n"
            f"(A) {response_a}\n(B) {response_b}\nThe answer is:")


def cut_at_stop(text: str) -> str:
    cut = min((i for i in (text.find(m) for m in STOP_MARKERS) if i >= 0), default=len(text))
    return text[:cut].strip()


# ---- feedback models ----------------------------------------------------------------------------
class LMFeedback:
    """A causal LM as the feedback model (default in CAI: the initial policy itself).

    causal_lm: a Hugging Face causal LM (only its backbone and `lm_head` weight are used for scoring).
    sampling: how critiques and revisions are sampled. seed: generation call k uses seed + k, so a
    run's sequence of calls is reproducible. max_length: most tokens of a feedback prompt (its end is
    kept: the request and the answer cue). batch_size: prompts per `generate` call / scoring forward."""

    def __init__(self, causal_lm, tokenizer, sampling: Sampling = Sampling(), *, seed: int = 0,
                 max_length: int | None = None, batch_size: int | None = None, backend: str = "auto",
                 chunk_size: int | None = None):
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer: LMFeedback needs a pad token (set tokenizer.pad_token)")
        self.causal_lm, self.tokenizer, self.sampling = causal_lm, tokenizer, sampling.validate()
        self.scorer = HiddenStatesModel(causal_lm)
        self.seed, self.calls = seed, 0
        self.max_length, self.batch_size = max_length, batch_size
        self.backend, self.chunk_size = backend, chunk_size

    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text).input_ids
        return ids if self.max_length is None else ids[-self.max_length:]

    def _generate(self, texts: list[str]) -> list[str]:
        tok = self.tokenizer
        out = sample_completions(self.causal_lm, [self._encode(t) for t in texts], self.sampling,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                 seed=self.seed + self.calls, batch_size=self.batch_size)
        self.calls += 1
        return [cut_at_stop(tok.decode(ids, skip_special_tokens=True)) for ids in out]

    def critique_batch(self, items) -> list[str]:
        return self._generate([critique_prompt(*it) for it in items])

    def revise_batch(self, items) -> list[str]:
        return self._generate([revision_prompt(*it) for it in items])

    @torch.no_grad()
    def compare_batch(self, items) -> list[float]:
        """P(A better) of each (prompt, response_a, response_b, principle): softmax over the two
        continuations' sequence log-probs, sigmoid(log p(" (A)") − log p(" (B)")), in float64."""
        choice_ids = [self.tokenizer(c, add_special_tokens=False).input_ids for c in CHOICES]
        device = next(self.causal_lm.parameters()).device
        was_training = self.causal_lm.training
        self.causal_lm.eval()
        out = []
        try:
            size = self.batch_size or len(items)
            for start in range(0, len(items), size):
                ctx = [self._encode(comparison_prompt(*it)) for it in items[start:start + size]]
                batch = encode_rows(ctx + ctx, [choice_ids[0]] * len(ctx) + [choice_ids[1]] * len(ctx),
                                    self.tokenizer.pad_token_id)
                logps, _ = sequence_logps(self.scorer, *(batch[k].to(device) for k in
                                                         ("input_ids", "attention_mask", "labels")),
                                          backend=self.backend, chunk_size=self.chunk_size)
                log_a, log_b = logps.double().chunk(2)
                out += torch.sigmoid(log_a - log_b).tolist()
        finally:
            self.causal_lm.train(was_training)
        return out

    def critique(self, prompt, response, principle) -> str:
        return self.critique_batch([(prompt, response, principle)])[0]

    def revise(self, prompt, response, critique, principle) -> str:
        return self.revise_batch([(prompt, response, critique, principle)])[0]

    def compare(self, prompt, response_a, response_b, principle) -> float:
        return self.compare_batch([(prompt, response_a, response_b, principle)])[0]


class CallableFeedback:
    """Plain functions as the feedback model; any may be left out if its stage is not run:

        CallableFeedback(critique=lambda prompt, response, principle: "...",
                         revise=lambda prompt, response, critique, principle: "...",
                         compare=lambda prompt, a, b, principle: 1.0 if len(a) < len(b) else 0.0)
    """

    def __init__(self, critique=None, revise=None, compare=None):
        for name, fn in (("critique", critique), ("revise", revise), ("compare", compare)):
            if fn is not None and not callable(fn):
                raise ValueError(f"{name}: expected a callable, got {type(fn).__name__}")
        self.functions = {"critique": critique, "revise": revise, "compare": compare}

    def _fn(self, name):
        if self.functions[name] is None:
            raise ValueError(f"feedback: no `{name}` function was given to CallableFeedback")
        return self.functions[name]

    def critique(self, prompt, response, principle) -> str:
        return str(self._fn("critique")(prompt, response, principle))

    def revise(self, prompt, response, critique, principle) -> str:
        return str(self._fn("revise")(prompt, response, critique, principle))

    def compare(self, prompt, response_a, response_b, principle) -> float:
        return float(self._fn("compare")(prompt, response_a, response_b, principle))

    def identity(self) -> str:
        return "callable:" + ",".join(f"{k}={getattr(f, '__module__', '')}.{getattr(f, '__qualname__', f)}"
                                      for k, f in self.functions.items() if f is not None)


def as_feedback(obj):
    """A feedback model from an object with the methods, or a dict of functions (→ CallableFeedback)."""
    if isinstance(obj, dict):
        return CallableFeedback(**obj)
    if not any(hasattr(obj, m) for m in ("critique", "revise", "compare")):
        raise ValueError(f"feedback: {type(obj).__name__} has none of critique/revise/compare; "
                         "pass an object with them, a dict of functions, or a CallableFeedback")
    return obj


def feedback_call(feedback, method: str, items: list[tuple]) -> list:
    """`method` ("critique", "revise" or "compare") on each argument tuple, batched when the feedback
    model has `<method>_batch`. Comparisons are checked to be probabilities."""
    if hasattr(feedback, f"{method}_batch"):
        out = list(getattr(feedback, f"{method}_batch")(items))
    elif hasattr(feedback, method):
        out = [getattr(feedback, method)(*it) for it in items]
    else:
        raise ValueError(f"feedback: {type(feedback).__name__} has no {method}() method")
    if len(out) != len(items):
        raise ValueError(f"feedback: {method} returned {len(out)} results for {len(items)} inputs")
    if method == "compare":
        out = [float(p) for p in out]
        bad = [p for p in out if not (math.isfinite(p) and 0.0 <= p <= 1.0)]
        if bad:
            raise ValueError(f"feedback: compare must return P(A better) in [0, 1], got {bad[0]!r}")
    else:
        out = [str(t) for t in out]
    return out


def revision_win_rate(feedback, prompts, before, after, principles) -> float:
    """Fraction of prompts where the feedback model prefers the `after` response to the `before` one.

    Each pair is judged in both orders so the A/B position bias cancels:
    P(after better) = ½·[compare(after, before) + 1 − compare(before, after)]; a win is P > ½ and a tie
    (P = ½) counts half. `principles`: one Principle for all prompts, or one per prompt."""
    n = len(prompts)
    if not isinstance(principles, (list, tuple)):
        principles = [principles] * n
    if not (len(before) == len(after) == len(principles) == n) or n == 0:
        raise ValueError(f"revision_win_rate: prompts ({n}), before ({len(before)}), after ({len(after)}) and "
                         f"principles ({len(principles)}) must be non-empty and of the same length")
    forward = feedback_call(feedback, "compare", list(zip(prompts, after, before, principles)))
    swapped = feedback_call(feedback, "compare", list(zip(prompts, before, after, principles)))
    p_after = [0.5 * (f + 1.0 - s) for f, s in zip(forward, swapped)]
    return sum(1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0 for p in p_after) / n
