"""The README's quick-start code runs as printed and computes what its comments say."""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from helpers import assert_close

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_quick_start_runs_and_matches_the_naive_computation():
    code = next(b for b in python_blocks() if "alignfast.linear_logprobs(" in b)
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(code, str(README), "exec"), ns)   # noqa: S102 - the README's own example
    hidden, weight, labels, out = ns["hidden"], ns["weight"], ns["labels"], ns["out"]
    assert hidden.grad is not None and weight.grad is not None, "the example's backward ran"
    logits = (hidden.detach().double() @ weight.detach().double().t())
    logp = logits.log_softmax(-1)
    mask = labels != -100
    want = torch.where(mask, logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0], 0.0)
    for name, got in (("logprobs", out.logprobs), ("entropy", out.entropy), ("lse", out.lse)):
        assert got.shape == labels.shape and got.dtype == torch.float32, name
        assert (got[~mask] == 0).all(), f"{name}: 0 where ignored"
    assert_close(out.logprobs, want, rtol=1e-6, name="logprobs")   # fp32 against float64, scale-relative
    assert_close(out.lse[mask], logits.logsumexp(-1)[mask], rtol=1e-6, name="lse")
    naive = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
    assert_close(ns["loss"], naive, rtol=1e-6, name="loss")
