"""PPO in a hand-written PyTorch loop with `alignfast.losses.LinearPPOLoss`: no [tokens, vocab] logits.

Each iteration samples answers from the policy, scores them, and takes a few clipped-surrogate updates
with a k3 KL penalty to the frozen reference; the log-probs (rollout, reference, policy) all come from
hidden states and lm_head weights:

    usual:      logp = log_softmax(model(ids).logits)[targets]                 # [B, T, V] logits
                ratio = exp(logp - old_logp); loss = max(-A·ratio, -A·clip(ratio)) + β·k3 ...
    alignfast:  loss, metrics = ppo(hidden, head.weight, labels, old_logprobs, advantages,
                                    ref_hidden=ref_hidden, ref_weight=ref_head.weight)

The task: continue the prompt by counting up from its last token; the reward is the fraction of answer
tokens that do. Runs on CPU in seconds with a tiny random-init Llama (nothing is downloaded):

    python examples/plain_loop_ppo.py --iterations 15
"""
from __future__ import annotations

import argparse
import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignfast import linear_logprobs
from alignfast.integrations.transformers import last_hidden_states, output_head
from alignfast.losses import LinearPPOLoss

VOCAB, PAD, PROMPT, ANSWER = 16, 0, 3, 4


def prompts(generator: torch.Generator, batch: int = 16) -> torch.Tensor:
    return torch.randint(1, VOCAB - 1, (batch, PROMPT), generator=generator)


def targets_of(ids: torch.Tensor) -> torch.Tensor:
    """Labels shifted to their positions: position t predicts token t + 1, for the answer tokens only."""
    labels = torch.cat([ids[:, 1:], torch.full((ids.shape[0], 1), -100)], dim=1)
    labels[:, :PROMPT - 1] = -100
    return labels


def reward(ids: torch.Tensor) -> torch.Tensor:
    """[B] fraction of answer tokens that count up from the token before them (within 1..V-1)."""
    prev, answer = ids[:, PROMPT - 1:-1], ids[:, PROMPT:]
    return (answer == prev % (VOCAB - 1) + 1).float().mean(-1)


def token_logprobs(model, ids, labels) -> torch.Tensor:
    """[B, T] log-probs of the labels (0 where ignored), without gradient: the rollout's or the reference's."""
    with torch.no_grad():
        hidden = last_hidden_states(model, ids, torch.ones_like(ids))
        return linear_logprobs(hidden, output_head(model).weight, labels).logprobs


def ppo_loss(ppo: LinearPPOLoss, policy, reference, ids, labels, old_logprobs, advantages):
    """(loss, metrics) of one update on a rollout, from the hidden states of both models."""
    mask = torch.ones_like(ids)
    hidden = last_hidden_states(policy, ids, mask)
    with torch.no_grad():
        ref_hidden = last_hidden_states(reference, ids, mask)
    return ppo(hidden, output_head(policy).weight, labels, old_logprobs, advantages, ref_hidden=ref_hidden,
               ref_weight=output_head(reference).weight)


def main(iterations: int = 15, seed: int = 0, lr: float = 1e-2, epochs: int = 2) -> list[dict]:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, pad_token_id=PAD)
    policy = LlamaForCausalLM(config)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    ppo = LinearPPOLoss(clip_eps=0.2, kl_coef=0.02, kl_estimator="k3")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    history = []
    for it in range(iterations):
        # rollout: sample, score, keep the sampling policy's log-probs
        with torch.no_grad():
            ids = policy.generate(prompts(generator), attention_mask=None, do_sample=True, top_k=0,
                                  max_new_tokens=ANSWER, min_new_tokens=ANSWER, pad_token_id=PAD)
        labels, r = targets_of(ids), reward(ids)
        old_logprobs = token_logprobs(policy, ids, labels)
        advantages = (r - r.mean()) / (r.std() + 1e-6)     # one per completion, on each of its tokens
        for _ in range(epochs):                              # the later epochs are off-policy: ρ ≠ 1, clipped
            loss, metrics = ppo_loss(ppo, policy, reference, ids, labels, old_logprobs, advantages)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        history.append({"reward": r.mean().item(), "loss": loss.item(), **{k: v.item() for k, v in metrics.items()}})
        if it % 5 == 0 or it == iterations - 1:
            print(f"iteration {it:3d}  reward {r.mean().item():.3f}  kl {metrics['kl'].item():.4f}  "
                  f"clipfrac {metrics['clipfrac'].item():.3f}")
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    main(**vars(parser.parse_args()))
