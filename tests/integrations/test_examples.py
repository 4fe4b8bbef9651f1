"""The examples in examples/ run, learn, and compute the same loss as the logits-based one."""
import importlib.util
import math
import pathlib

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from helpers import assert_close  # noqa: E402

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_loop_sft_loss_is_the_logits_loss():
    ex = load("plain_loop_sft")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=ex.VOCAB, hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, intermediate_size=64))
    ids, mask, labels = ex.toy_batch(torch.Generator().manual_seed(3))
    assert (labels != -100).any() and (mask == 0).any()
    logits = model(ids, attention_mask=mask).logits
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    assert_close(ex.sft_loss(model, ids, mask, labels), expected, rtol=1e-5, name="sft_loss")


def test_plain_loop_sft_runs_and_learns(capsys):
    losses = load("plain_loop_sft").main(steps=15)
    assert len(losses) == 15 and all(map(math.isfinite, losses))
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5, losses
    assert "step" in capsys.readouterr().out


def test_plain_loop_dpo_loss_is_the_logits_loss():
    """The example's loss and policy gradients equal DPO computed from both models' logits."""
    ex = load("plain_loop_dpo")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=ex.VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    policy, reference = LlamaForCausalLM(config), LlamaForCausalLM(config).requires_grad_(False)
    ids, mask, labels = ex.toy_pairs(torch.Generator().manual_seed(3))
    loss, metrics = ex.dpo_step_loss(ex.LinearDPOLoss(beta=0.1), policy, reference, ids, mask, labels)
    got = torch.autograd.grad(loss, list(policy.parameters()))

    def seq_logps(model):
        logp = F.log_softmax(model(ids, attention_mask=mask).logits.double(), -1)
        valid = labels != -100
        return (logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * valid).sum(-1)

    pairs = ids.shape[0] // 2
    logratio = seq_logps(policy) - seq_logps(reference)
    want = -F.logsigmoid(0.1 * (logratio[:pairs] - logratio[pairs:])).mean()
    assert_close(loss, want, rtol=1e-5, name="dpo loss")
    for g, w in zip(got, torch.autograd.grad(want, list(policy.parameters()))):
        assert_close(g, w.float(), rtol=1e-4, atol=1e-6 * (1 + w.abs().max().item()), name="policy gradient")
    assert_close(metrics["rewards/margins"], 0.1 * (logratio[:pairs] - logratio[pairs:]).mean(), rtol=1e-5,
                 name="margin")


def test_plain_loop_dpo_runs_and_learns(capsys):
    history = load("plain_loop_dpo").main(steps=12)
    assert len(history) == 12 and all(math.isfinite(h["loss"]) for h in history)
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the policy starts as the reference
    assert history[-1]["loss"] < history[0]["loss"] - 0.1 and history[-1]["rewards/margins"] > 0.2, history[-1]
    assert "margin" in capsys.readouterr().out


def test_plain_loop_ppo_loss_is_the_logits_loss():
    """One off-policy update of the example: its loss and policy gradients equal PPO's clipped surrogate with
    the k3 penalty computed from both models' logits (token mean over the answer tokens)."""
    ex = load("plain_loop_ppo")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=ex.VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    policy, reference = LlamaForCausalLM(config), LlamaForCausalLM(config).requires_grad_(False)
    g = torch.Generator().manual_seed(4)
    ids = torch.cat([ex.prompts(g), torch.randint(1, ex.VOCAB, (16, ex.ANSWER), generator=g)], dim=1)
    labels = ex.targets_of(ids)
    valid = labels != -100
    old = (ex.token_logprobs(policy, ids, labels) + 0.3 * torch.randn(labels.shape, generator=g)) * valid
    adv = torch.randn(16, generator=g)
    ppo = ex.LinearPPOLoss(clip_eps=0.2, kl_coef=0.02, kl_estimator="k3")
    loss, metrics = ex.ppo_loss(ppo, policy, reference, ids, labels, old, adv)
    got = torch.autograd.grad(loss, list(policy.parameters()))

    def logps(model):
        logp = F.log_softmax(model(ids).logits.double(), -1)
        return logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)

    lp, ref = logps(policy), logps(reference)
    ratio = torch.exp(lp - old.double())
    a = adv.double()[:, None]
    surrogate = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2))
    k3 = torch.exp(ref - lp) - (ref - lp) - 1
    want = ((surrogate + 0.02 * k3) * valid).sum() / valid.sum()
    assert_close(loss, want, rtol=1e-5, name="ppo loss")
    for gv, w in zip(got, torch.autograd.grad(want, list(policy.parameters()))):
        assert_close(gv, w.float(), rtol=1e-4, atol=1e-6 * (1 + w.abs().max().item()), name="policy gradient")
    assert 0 < metrics["clipfrac"] < 1


def test_plain_loop_ppo_runs_and_learns(capsys):
    history = load("plain_loop_ppo").main(iterations=15)
    rewards = [h["reward"] for h in history]
    assert len(history) == 15 and all(math.isfinite(h["loss"]) for h in history)
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards
    assert "reward" in capsys.readouterr().out
