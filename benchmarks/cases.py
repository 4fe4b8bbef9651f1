"""The registry of cases: op x shape x dtype x impl, grouped in suites."""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field

import torch

from alignfast.ops.options import DEFAULT_CHUNK_BYTES
from benchmarks.ops import OPS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclass(frozen=True)
class Case:
    op: str
    impl: str
    n: int
    h: int
    v: int
    dtype: str
    device_type: str   # "cpu" or "cuda"
    model: str = ""    # the model whose LM head the shape is (scaled down in a CPU suite), or ""

    @property
    def id(self) -> str:
        model = f"-{self.model}" if self.model else ""
        return f"{self.op}-{self.impl}{model}-N{self.n}-H{self.h}-V{self.v}-{self.dtype}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def asdict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Suite:
    name: str
    cases: tuple
    rounds: int           # timed rounds (median and IQR over them)
    warmup: int           # untimed rounds first; then one that measures memory, then the timed ones
    timeout_s: int        # per case process
    note: str = ""        # how the shapes were chosen, for the report
    env: dict = field(default_factory=dict)   # case-process environment, unless already set


def grid(ops, impls, shapes, dtypes, device) -> tuple:
    """Shapes outermost, so a run cut short by a time budget has every op at the first shapes."""
    return tuple(Case(op, impl, n, h, v, dt, device)
                 for (n, h, v), dt, op, impl in itertools.product(shapes, dtypes, ops, impls))


# hidden size and vocabulary of the LM heads of the models the issue names (each model's config.json)
MODELS = {"Llama-3-8B": (4096, 128256), "Qwen2.5-7B": (3584, 152064), "Gemma-2-2B": (2304, 256000)}


def model_grid(ops, impls, models, tokens, dtypes, device, scale: int = 1, once=()) -> tuple:
    """Each model's head, H and V divided by `scale` (V/H kept), at each token count; the impls in
    `once` only at the first token count (one row per model and op that records why they cannot run).

    Token counts outermost (the smallest first), then models, as in `grid`."""
    return tuple(Case(op, impl, n, MODELS[m][0] // scale, MODELS[m][1] // scale, dt, device, model=m)
                 for n, m, dt, op, impl in itertools.product(tokens, models, dtypes, ops, impls)
                 if impl not in once or n == tokens[0])


# the ops the cpu and gpu suites were sized with; the other fused losses have their own suite, cpu-losses
HEAD_OPS = ("linear_logprobs", "linear_cross_entropy", "cross_entropy_filtered", "dpo", "linear_kl")
LOSS_OPS = ("dpo", "kto", "ppo", "grpo", "simpo", "orpo", "cpo")
CPU_IMPLS = ("naive", "floor", "chunked", "cpp", "torch_compile", "liger", "trl")
# cpp (alignfast's native CPU backend) is left to the `cpu` suite, to fit the 20 minutes; liger and
# cce cannot run on a CPU and are recorded once per model (cce: not installed; Liger's CE is Triton)
CPU_MODEL_IMPLS = ("naive", "floor", "chunked", "torch_compile", "trl", "liger", "cce")
CPU_MODEL_TOKENS = (256, 512, 1024)
CPU_MODEL_SCALE = 8
TRL_DEFAULT_VOCAB_CHUNK = 32768   # benchmarks.third_party.TRL_VOCAB_CHUNK unless the environment sets it
# the GPU suite runs within gpu_check.sh's few minutes: the target shape (N=16384) first, then the
# ops and impls in the order the targets need them (torch.compile, ~1 min to compile, last)
GPU_OPS = ("linear_cross_entropy", "linear_logprobs", "dpo", "cross_entropy_filtered")
GPU_IMPLS = ("naive", "floor", "triton", "cuda", "liger", "cce", "chunked", "trl", "torch_compile")
GPU_TOKENS = (16384, 4096, 8192)

SUITES = {
    "smoke": Suite("smoke", grid(OPS, CPU_IMPLS, [(256, 64, 4096)], ["fp32"], "cpu"),
                   rounds=5, warmup=1, timeout_s=300),
    # the target shape; one naive fwd+bwd takes ~35 s on 2 cores, a case runs warmup+1+rounds
    "cpu": Suite("cpu", grid(HEAD_OPS, CPU_IMPLS, [(4096, 1024, 128256)], ["fp32"], "cpu"),
                 rounds=3, warmup=1, timeout_s=1800),
    # the three models' heads with H and V divided by 8 (Llama-3-8B 512/16032, Qwen2.5-7B 448/19008,
    # Gemma-2-2B 288/32000): V/H as in the model, 1/64 of its arithmetic per token. The chunk budgets
    # (alignfast's bytes, TRL's vocab tile) are divided by 8 too, so each method splits [N, V] into as
    # many chunks as at full size. ~15 min on 2 idle cores (benchmarks/README.md: the estimate).
    "cpu-models": Suite(
        "cpu-models",
        model_grid(("linear_logprobs", "linear_cross_entropy"), CPU_MODEL_IMPLS, MODELS, CPU_MODEL_TOKENS,
                   ["fp32"], "cpu", scale=CPU_MODEL_SCALE, once=("liger", "cce")),
        rounds=3, warmup=1, timeout_s=600,
        note=f"LM heads of {', '.join(MODELS)} with H and V divided by {CPU_MODEL_SCALE} (V/H as in the "
             f"model); chunk budgets divided by {CPU_MODEL_SCALE} too",
        env={"ALIGNFAST_CHUNK_BYTES": str(DEFAULT_CHUNK_BYTES // CPU_MODEL_SCALE),
             "ALIGNFAST_BENCH_TRL_VOCAB_CHUNK": str(TRL_DEFAULT_VOCAB_CHUNK // CPU_MODEL_SCALE)}),
    # the fused alignment losses, DPO to CPO, at a shape all seven fit in one run: 4 sequences of 512
    # tokens, a 32000 vocabulary (Llama-2's and Mistral-7B's)
    "cpu-losses": Suite(
        "cpu-losses",
        grid(LOSS_OPS, ("naive", "floor", "chunked", "liger", "trl"), [(2048, 1024, 32000)], ["fp32"], "cpu"),
        rounds=3, warmup=1, timeout_s=900,
        note="N=2048 (4 sequences of 512), H=1024, V=32000: a quarter of the vocabulary and half the tokens "
             "of the DPO target shape (N=4096, V=128256), so all seven methods fit one ~15-minute run"),
    # the fused DPO, KTO and PPO losses at the target shape (8 sequences of 512 tokens; a DPO
    # pair, 1024 rows, is longer than the default block): alignfast's default CPU backend against
    # naive, the floor, Liger-Kernel and TRL, ~75 min (`--impl` to run a part)
    "cpu-losses-target": Suite(
        "cpu-losses-target",
        grid(("dpo", "kto", "ppo"), ("naive", "floor", "cpp", "liger", "trl"), [(4096, 1024, 128256)], ["fp32"],
             "cpu"),
        rounds=3, warmup=1, timeout_s=1800,
        note="N=4096 (8 sequences of 512), H=1024, V=128256: the issue's target shape"),
    # model-shaped (Llama-3 8B head), a few token counts
    "gpu": Suite("gpu", grid(GPU_OPS, GPU_IMPLS, [(n, 4096, 128256) for n in GPU_TOKENS], ["bf16"], "cuda"),
                 rounds=20, warmup=3, timeout_s=600),
}


def find(suite: str, case_id: str) -> Case:
    for case in SUITES[suite].cases:
        if case.id == case_id:
            return case
    raise KeyError(f"no case {case_id!r} in suite {suite!r}")
