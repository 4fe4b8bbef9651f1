"""Shared by the TRL adapter tests: tiny data, TRL-vs-alignfast comparison of one compute_loss, peak memory.

Imported by tests/integrations/test_trl*.py (this folder is on sys.path: pytest's prepend import mode).
"""
import copy

import pytest
import torch

from alignfast.integrations import trl as atrl
from alignfast.integrations.trl import fused_head
from helpers import assert_close

LETTERS = "abcdefghij"


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """TRL's Trainer sets accelerate's process-wide state (mixed precision, ...); later tests that make
    their own Accelerator must not inherit it."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def words(g: torch.Generator, low: int, high: int) -> str:
    """A random string of `low`..`high`-1 letters (one token each with alignfast.models.tiny's tokenizer)."""
    n = int(torch.randint(low, high, (), generator=g))
    return "".join(LETTERS[i] for i in torch.randint(0, len(LETTERS), (n,), generator=g).tolist())


def common_args(tmp_path) -> dict:
    """Trainer arguments of every test: one small step on CPU, fp32 (TRL's configs default to bf16)."""
    return dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
                use_cpu=True, logging_steps=1, save_strategy="no", dataloader_num_workers=0, bf16=False)


def letter_a(completions, **_):
    """A reward with spread within each group, so that the advantages are not all zero."""
    return [c.count("a") + 0.1 * len(c) for c in completions]


def online_trainer(tmp_path, trl_class, config_class, trainer_cls=None, alignfast_options=None, **overrides):
    """A GRPO-style trainer (`trl_class`, or the alignfast subclass `trainer_cls`) on a tiny Llama, its reference
    a second tiny Llama saved where TRL loads it from; 8 prompts, 4 samples each, beta 0.2, temperature 0.7."""
    import datasets
    from alignfast.models.tiny import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    ref_dir = tmp_path / "ref"
    tiny_llama(tok, seed=1).save_pretrained(ref_dir)
    model = tiny_llama(tok, seed=0)
    model.config._name_or_path = str(ref_dir)  # the trainer loads its reference model from here
    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": words(g, 2, 6)} for _ in range(8)]
    args = config_class(**{**common_args(tmp_path), "per_device_train_batch_size": 8, "num_generations": 4,
                           "max_completion_length": 6, "beta": 0.2, "temperature": 0.7, **overrides})
    extra = {} if trainer_cls is None else {"alignfast_options": alignfast_options}
    return (trainer_cls or trl_class)(model=model, reward_funcs=letter_a, args=args, processing_class=tok,
                                      train_dataset=datasets.Dataset.from_list(rows), **extra)


def generation_batch(trainer):
    """`_generate_and_score_completions` on the first batch, sampling from a fixed seed."""
    prompts = next(iter(trainer.get_train_dataloader()))
    torch.manual_seed(0)
    return trainer._generate_and_score_completions(prompts)


class KernelCalls:
    """Counts the fused passes of alignfast and of TRL's own head (`ChunkedLogProbFunction`)."""

    def __init__(self, monkeypatch):
        from trl.trainer import utils

        self.alignfast = self.trl = 0
        real_ours, real_trls = fused_head.logprob_stats, utils._ChunkedLogProbFunction.apply

        def ours(*a, **k):
            self.alignfast += 1
            return real_ours(*a, **k)

        def trls(*a, **k):
            self.trl += 1
            return real_trls(*a, **k)

        monkeypatch.setattr(fused_head, "logprob_stats", ours)
        monkeypatch.setattr(utils._ChunkedLogProbFunction, "apply", trls)

    def snapshot(self):
        return self.alignfast, self.trl


def loss_grads_metrics(trainer, inputs, **loss_kwargs):
    """TRL's compute_loss on `inputs` and backward: (loss, {param: grad}, {metric: last value}).
    `num_tokens` is left out: it is a running total, not a function of this batch."""
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    for values in trainer._metrics["train"].values():
        values.clear()
    loss = trainer.compute_loss(model, copy.copy(inputs), **loss_kwargs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v and k != "num_tokens"}
    return loss.detach(), grads, metrics


def assert_same_as_trl(trainer, inputs, calls: KernelCalls, options=None, **loss_kwargs):
    """Loss, every parameter's gradient and every logged metric of one compute_loss equal TRL's own path; with
    the adapter, every fused call went to alignfast (none to TRL's head). Returns the metrics."""
    before = calls.snapshot()
    ref = loss_grads_metrics(trainer, inputs, **loss_kwargs)
    mid = calls.snapshot()
    atrl.use_alignfast(trainer, **(options or {}))
    try:
        fused = loss_grads_metrics(trainer, inputs, **loss_kwargs)
    finally:
        atrl.revert(trainer)
    after = calls.snapshot()
    assert mid[1] > before[1] and mid[0] == before[0], "TRL's own path did not run TRL's head"
    assert after[0] > mid[0] and after[1] == mid[1], "with the adapter, a fused call still went to TRL's head"

    assert_close(fused[0], ref[0], rtol=1e-5, name="loss")
    n_trainable = sum(p.requires_grad for p in trainer.model.parameters())
    assert fused[1].keys() == ref[1].keys() and len(ref[1]) == n_trainable
    for name in ref[1]:
        assert_close(fused[1][name], ref[1][name], rtol=1e-5, name=f"grad {name}")
    assert fused[2].keys() == ref[2].keys()
    for key, value in ref[2].items():
        assert fused[2][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    return ref[2]


def peak_bytes(fn) -> int:
    """Peak of the CPU bytes allocated and still alive while `fn` runs (every allocation of torch's CPU
    allocator, C++ kernels included, from the profiler's memory events)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.typed[0] == _EventType.Allocation:
            events.append((node.start_time_ns, node.typed[1].alloc_size))  # negative: a free
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak
