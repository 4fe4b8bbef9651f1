"""DPO in a hand-written PyTorch loop with `alignfast.losses.LinearDPOLoss`: no [tokens, vocab] logits.

The policy and the frozen reference each give their last hidden states; the loss module takes them with
the lm_head weights and streams the vocabulary (3 projections for the policy, 1 for the reference):

    usual:      logps = log_softmax(model(ids).logits)[targets].sum(-1)    # [2P, T, V] logits, twice
                loss = -logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
    alignfast:  loss, metrics = dpo(hidden, head.weight, labels, ref_hidden=ref_hidden, ref_weight=ref_head.weight)

Chosen answers count up from the prompt's last token, rejected ones are random tokens. Runs on CPU in
seconds with a tiny random-init Llama (nothing is downloaded):

    python examples/plain_loop_dpo.py --steps 20
"""
from __future__ import annotations

import argparse
import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignfast.integrations.transformers import last_hidden_states, output_head
from alignfast.losses import LinearDPOLoss

VOCAB, PAD = 64, 0


def toy_pairs(generator: torch.Generator, pairs: int = 8, prompt: int = 4, answer: int = 6):
    """(ids [2P, T], mask, labels): P chosen rows (the answer counts up from the prompt's last token),
    then the P rejected rows (random answers) to the same prompts. Labels are -100 on the prompts (and the
    first position, which nothing predicts) and already shifted: labels[:, t] is the target of position t."""
    prompts = torch.randint(1, VOCAB - 1, (pairs, prompt), generator=generator)
    chosen = (prompts[:, -1:] + torch.arange(1, answer + 1) - 1) % (VOCAB - 1) + 1
    rejected = torch.randint(1, VOCAB - 1, (pairs, answer), generator=generator)
    ids = torch.cat([torch.cat([prompts, chosen], 1), torch.cat([prompts, rejected], 1)])
    mask = torch.ones_like(ids)
    targets = torch.cat([ids[:, 1:], torch.full((2 * pairs, 1), -100)], dim=1)   # position t predicts t + 1
    targets[:, :prompt - 1] = -100                                               # the prompt's tokens
    return ids, mask, targets


def dpo_step_loss(dpo: LinearDPOLoss, policy, reference, ids, mask, labels):
    """(loss, metrics) of one batch of pairs, from the hidden states of both models."""
    hidden = last_hidden_states(policy, ids, mask)
    with torch.no_grad():
        ref_hidden = last_hidden_states(reference, ids, mask)
    return dpo(hidden, output_head(policy).weight, labels, ref_hidden=ref_hidden,
               ref_weight=output_head(reference).weight)


def main(steps: int = 20, seed: int = 0, lr: float = 5e-3, beta: float = 0.1) -> list[dict]:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, pad_token_id=PAD)
    policy = LlamaForCausalLM(config)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)   # frozen at the starting point
    dpo = LinearDPOLoss(beta=beta)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    history = []
    for step in range(steps):
        ids, mask, labels = toy_pairs(generator)
        loss, metrics = dpo_step_loss(dpo, policy, reference, ids, mask, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append({"loss": loss.item(), **{k: v.item() for k, v in metrics.items()}})
        if step % 5 == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}  margin {metrics['rewards/margins'].item():+.3f}  "
                  f"accuracy {metrics['rewards/accuracies'].item():.2f}")
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    main(**vars(parser.parse_args()))
