"""SFT in a hand-written PyTorch loop with `alignfast.linear_cross_entropy`: no [tokens, vocab] logits.

The only change from the usual loop is where the loss comes from:

    usual:      logits = model(ids, attention_mask=mask).logits             # [B, T, V] in memory
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    alignfast:  hidden = last_hidden_states(model, ids, mask)               # [B, T, H], backbone only
                loss = linear_cross_entropy(hidden[:, :-1], head.weight, labels[:, 1:])

Runs on CPU in seconds with a tiny random-init Llama (nothing is downloaded):

    python examples/plain_loop_sft.py --steps 30
"""
from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignfast import linear_cross_entropy
from alignfast.integrations.transformers import last_hidden_states, output_head

VOCAB, PAD = 64, 0


def toy_batch(generator: torch.Generator, batch: int = 8, prompt: int = 4, answer: int = 6):
    """Prompt = random tokens; the answer counts up from the prompt's last token (each token = previous + 1,
    wrapping within 1..V-1); right-padded to varying lengths.

    Labels are -100 on the prompt and the padding, as SFT masks them.
    """
    length = prompt + answer
    ids = torch.randint(1, VOCAB - 1, (batch, prompt), generator=generator)
    answers = (ids[:, -1:] + torch.arange(1, answer + 1) - 1) % (VOCAB - 1) + 1
    ids = torch.cat([ids, answers], dim=1)
    keep = torch.randint(prompt + 2, length + 1, (batch,), generator=generator)
    mask = (torch.arange(length) < keep[:, None]).long()
    ids = ids.masked_fill(mask == 0, PAD)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt] = -100
    return ids, mask, labels


def sft_loss(model, ids, mask, labels):
    """Mean next-token cross-entropy over the answer tokens, straight from the hidden states."""
    head = output_head(model)  # lm_head weight (tied or not) and bias; Llama has no softcap or logit scale
    hidden = last_hidden_states(model, ids, mask)  # (models that have them: integrations.causal_lm_loss)
    return linear_cross_entropy(hidden[:, :-1], head.weight, labels[:, 1:], head.bias, softcap=head.softcap)


def main(steps: int = 30, seed: int = 0, lr: float = 1e-2) -> list[float]:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, pad_token_id=PAD)
    model = LlamaForCausalLM(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        ids, mask, labels = toy_batch(generator)
        loss = sft_loss(model, ids, mask, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    main(**vars(parser.parse_args()))
