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
