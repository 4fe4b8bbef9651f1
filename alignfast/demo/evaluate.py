"""The demo's held-out metrics, one per stage. Log-probs come from the fused `sequence_logps` /
`token_logps` (hidden states + lm_head weight, no logits); responses from `sample_completions`.

    task_accuracy        SFT: greedy answers that give the right reversal (and the share in full sentences)
    reward_accuracy      RM: pairs where r(chosen) > r(rejected)
    implicit_accuracy    DPO/KTO: pairs where β·log(π/π_ref) ranks chosen over rejected
    online_metrics       PPO/GRPO: mean reward of samples (temperature 1), KL(π‖π_ref) per completion
    win_rate             CAI: prompts where the feedback model prefers one model's answer to another's

Pairwise accuracies and win rates count a tie as half, so a model judged against itself scores
exactly 0.5 (chance), which is every "before" of DPO, KTO and CAI.
"""
from __future__ import annotations

import torch

from alignfast.data import PreferenceCollator, prepare_dataset
from alignfast.data.collators import encode_rows
from alignfast.demo.task import is_correct, is_well_formed
from alignfast.trainers.feedback import feedback_call
from alignfast.trainers.generation import Sampling, sample_completions
from alignfast.trainers.modeling import HiddenStatesModel
from alignfast.trainers.sequence import sequence_logps, token_logps

BATCH = 64


def ranked(better: torch.Tensor, worse: torch.Tensor) -> float:
    """Fraction of rows where `better` > `worse`, ties counted half."""
    return float(((better > worse).float() + 0.5 * (better == worse).float()).mean())


def responses(causal_lm, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.0,
              seed: int = 0) -> list[str]:
    """Decoded completions of `prompts` (greedy by default)."""
    ids = [tokenizer(p).input_ids for p in prompts]
    out = sample_completions(causal_lm, ids, Sampling(max_new_tokens, temperature), eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, seed=seed, batch_size=BATCH)
    return tokenizer.batch_decode(out, skip_special_tokens=True)


def task_accuracy(causal_lm, tokenizer, records: list[dict], *, max_new_tokens: int) -> dict:
    """records: prompt records (`prompt`, `answer`). Greedy answers: accuracy, well-formed share, examples."""
    texts = responses(causal_lm, tokenizer, [r["prompt"] for r in records], max_new_tokens=max_new_tokens)
    return {"accuracy": sum(is_correct(t, r["answer"]) for t, r in zip(texts, records)) / len(records),
            "well_formed": sum(map(is_well_formed, texts)) / len(records), "responses": texts}


def _pair_batches(records: list[dict], tokenizer):
    examples = prepare_dataset(records, "preference", tokenizer).examples
    collate = PreferenceCollator(tokenizer.pad_token_id)
    for i in range(0, len(examples), BATCH):
        yield collate(examples[i:i + BATCH])


@torch.no_grad()
def reward_accuracy(reward_model, tokenizer, records: list[dict]) -> float:
    """reward_model: a `ScalarHeadModel`; records: preference records."""
    was_training = reward_model.training
    reward_model.eval()
    device = next(reward_model.parameters()).device
    chosen, rejected = [], []
    for batch in _pair_batches(records, tokenizer):
        c, r = reward_model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).cpu().chunk(2)
        chosen.append(c), rejected.append(r)
    reward_model.train(was_training)
    return ranked(torch.cat(chosen), torch.cat(rejected))


@torch.no_grad()
def _sequence_logps(causal_lm, batch) -> torch.Tensor:
    model = HiddenStatesModel(causal_lm).eval()
    return sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])[0]


@torch.no_grad()
def implicit_accuracy(policy_lm, reference_lm, tokenizer, records: list[dict], beta: float) -> dict:
    """Implicit rewards r = β·(log π(y|x) − log π_ref(y|x)) of the chosen and rejected completions of
    held-out preference records: accuracy (r_chosen > r_rejected) and the mean margin."""
    margins = []
    for batch in _pair_batches(records, tokenizer):
        r = beta * (_sequence_logps(policy_lm, batch) - _sequence_logps(reference_lm, batch))
        chosen, rejected = r.chunk(2)
        margins.append(chosen - rejected)
    m = torch.cat(margins)
    return {"accuracy": ranked(m, torch.zeros_like(m)), "margin": float(m.mean())}


@torch.no_grad()
def online_metrics(policy_lm, reference_lm, tokenizer, records: list[dict], reward_fn, *, max_new_tokens: int,
                   samples: int = 2, seed: int = 0, reward_model=None) -> dict:
    """`samples` completions per held-out prompt at temperature 1 (seeded): the mean of `reward_fn`
    (called like a reward function, with the records' columns), the mean reward-model score when one is
    given, and KL(π‖π_ref) per completion, estimated as the mean of Σ_t log π(y_t) − log π_ref(y_t)
    over the samples y ~ π (0 when π = π_ref)."""
    prompts = [r["prompt"] for r in records for _ in range(samples)]
    columns = {k: [r[k] for r in records for _ in range(samples)] for k in records[0] if k != "prompt"}
    ids = [tokenizer(p).input_ids for p in prompts]
    completions = sample_completions(policy_lm, ids, Sampling(max_new_tokens, 1.0), eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id, seed=seed, batch_size=BATCH)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    rewards = torch.tensor(reward_fn(prompts, texts, **columns), dtype=torch.float32)
    policy, reference = HiddenStatesModel(policy_lm).eval(), HiddenStatesModel(reference_lm).eval()
    kls, scores = [], []
    for i in range(0, len(ids), BATCH):
        batch = encode_rows(ids[i:i + BATCH], completions[i:i + BATCH], tokenizer.pad_token_id)
        args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
        kls.append((token_logps(policy, *args)[0] - token_logps(reference, *args)[0]).sum(-1))
        if reward_model is not None:
            scores.append(reward_model.eval()(batch["input_ids"], batch["attention_mask"]))
    out = {"reward": float(rewards.mean()), "kl": float(torch.cat(kls).mean()),
           "well_formed": sum(map(is_well_formed, texts)) / len(texts)}
    if reward_model is not None:
        out["rm_score"] = float(torch.cat(scores).mean())
    return out


def win_rate(feedback, principles, prompts: list[str], baseline: list[str], candidate: list[str]) -> float:
    """Fraction of prompts where the feedback model prefers `candidate`'s response to `baseline`'s.

    P(candidate better) is averaged over the principles, each judged in both orders (the A/B position
    bias cancels): ½·[compare(cand, base) + 1 − compare(base, cand)]. A win is P > ½, a tie counts half."""
    p = torch.zeros(len(prompts), dtype=torch.float64)
    triples = list(zip(prompts, baseline, candidate))
    for principle in principles:
        forward = feedback_call(feedback, "compare", [(q, c, b, principle) for q, b, c in triples])
        swapped = feedback_call(feedback, "compare", [(q, b, c, principle) for q, b, c in triples])
        p += 0.5 * (torch.tensor(forward, dtype=torch.float64) + 1.0 - torch.tensor(swapped, dtype=torch.float64))
    return ranked(p / len(principles), torch.full_like(p, 0.5))
