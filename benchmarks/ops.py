"""The ops under benchmark. Adding an op is one `OpSpec` entry in `OPS`.

An op maps an input dict (from `make_inputs`) to either a per-token tensor [N] (backward with a
random upstream gradient: `(out * upstream).sum().backward()`) or a scalar loss (`.backward()`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

import alignfast
from benchmarks import third_party


@dataclass
class Inputs:
    args: dict                # keyword arguments of every implementation of the op
    upstream: torch.Tensor    # [N] fp32 gradient for per-token outputs
    params: list              # the tensors gradients are computed for

    def reset_grads(self) -> None:
        for p in self.params:
            p.grad = None


def head_inputs(n: int, h: int, v: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
    """hidden [N, H], weight [V, H] (both requiring grad), targets [N] in [0, V), upstream [N] fp32."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(device=device, dtype=dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    upstream = torch.randn(n, generator=g).to(device)
    return Inputs({"hidden": hidden, "weight": weight, "targets": targets}, upstream, [hidden, weight])


@dataclass(frozen=True)
class OpSpec:
    naive: Callable[..., torch.Tensor]   # PyTorch eager on materialised logits
    fused: Callable[..., torch.Tensor]   # alignfast, with a `backend=` keyword
    floor_matmuls: int                   # [N, H] x [H, V]-sized products that fwd+bwd needs
    make_inputs: Callable[..., Inputs] = head_inputs
    third_party: Mapping[str, Callable[..., torch.Tensor]] = field(default_factory=dict)


def naive_logprobs(hidden, weight, targets):
    logits = (hidden @ weight.t()).float()
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


def naive_cross_entropy(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.t()).float(), targets)


def peaked_inputs(n: int, h: int, v: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
    """Trained-model-like logits: each hidden state points at its target's embedding (logit ≈ 16)
    plus noise that spreads the rest (logit std ≈ 2.5): p(target) ≈ 0.75, ~0.1% of the vocabulary
    above 2⁻¹² per token. What gradient filtering is for."""
    inputs = head_inputs(n, h, v, dtype, device, seed)
    weight, targets = inputs.args["weight"], inputs.args["targets"]
    g = torch.Generator(device="cpu").manual_seed(seed + 2)
    with torch.no_grad():
        w = weight.float()
        direction = w[targets] / w[targets].norm(dim=1, keepdim=True).square()
        noise = 2.5 * torch.randn(n, h, generator=g).to(device)
        hidden = (16.0 * direction + noise - (noise * w[targets]).sum(1, keepdim=True) * direction)
        inputs.args["hidden"] = hidden.to(dtype).requires_grad_()
    inputs.params[0] = inputs.args["hidden"]
    return inputs


# CCE's rule (skip where p < 2⁻¹²), in the units of dL/dz: a mean over N tokens scales p by 1/N
def filtered_cross_entropy(hidden, weight, targets, backend):
    return alignfast.linear_cross_entropy(hidden, weight, targets, backend=backend,
                                          grad_filter_eps=2.0**-12 / targets.numel())


def dpo_inputs(n: int, h: int, v: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
    """DPO with a reference model: n tokens = 2·pairs sequences of `seq_len` (512, or n/4 when small),
    chosen rows first; the reference's hidden states and head take no gradient."""
    seq_len = 512 if n >= 2048 else max(n // 4, 1)
    inputs = head_inputs(n, h, v, dtype, device, seed)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    ref_hidden = torch.randn(n, h, generator=g).to(device=device, dtype=dtype)
    ref_weight = (torch.randn(v, h, generator=g) / h**0.5).to(device=device, dtype=dtype)
    inputs.args.update(ref_hidden=ref_hidden, ref_weight=ref_weight, seq_len=seq_len)
    return inputs


def naive_dpo(hidden, weight, targets, ref_hidden, ref_weight, seq_len, beta=0.1):
    """Materialised logits for policy and reference, TRL-style sequence sums, sigmoid DPO."""
    def sequence_logps(h, w):
        logits = (h @ w.t()).float()
        return logits.log_softmax(-1).gather(-1, targets[:, None]).view(-1, seq_len).sum(-1)

    with torch.no_grad():
        ref = sequence_logps(ref_hidden, ref_weight)
    logratio = sequence_logps(hidden, weight) - ref
    chosen, rejected = logratio.chunk(2)
    return -F.logsigmoid(beta * (chosen - rejected)).mean()


def fused_dpo(hidden, weight, targets, ref_hidden, ref_weight, seq_len, backend, beta=0.1):
    h = hidden.shape[-1]
    loss, _ = alignfast.losses.LinearDPOLoss(beta=beta, backend=backend)(
        hidden.view(-1, seq_len, h), weight, targets.view(-1, seq_len),
        ref_hidden=ref_hidden.view(-1, seq_len, h), ref_weight=ref_weight)
    return loss


OPS: dict[str, OpSpec] = {
    # forward logits, then (recompute logits,) grad_hidden, grad_weight for any upstream gradient
    "linear_logprobs": OpSpec(
        naive=naive_logprobs,
        fused=lambda hidden, weight, targets, backend: alignfast.linear_logprobs(
            hidden, weight, targets, backend=backend).logprobs,
        floor_matmuls=4,
        third_party={"trl": third_party.trl_logprobs, "cce": third_party.cce_logprobs},
    ),
    # logits, then grad_hidden and grad_weight (the gradient can be formed in the forward)
    "linear_cross_entropy": OpSpec(
        naive=naive_cross_entropy,
        fused=lambda hidden, weight, targets, backend: alignfast.linear_cross_entropy(
            hidden, weight, targets, backend=backend),
        floor_matmuls=3,
        third_party={"liger": third_party.liger_cross_entropy, "trl": third_party.trl_cross_entropy,
                     "cce": third_party.cce_cross_entropy},
    ),
    # the same on peaked logits with grad_filter_eps: the two gradient products shrink to the vocab
    # columns that matter (fused impls only; naive and floor are the exact computation)
    "cross_entropy_filtered": OpSpec(naive=naive_cross_entropy, fused=filtered_cross_entropy, floor_matmuls=3,
                                     make_inputs=peaked_inputs),
    # policy: logits, grad_hidden, grad_weight (the gradient is known per pair in the forward);
    # reference: logits only
    "dpo": OpSpec(naive=naive_dpo, fused=fused_dpo, floor_matmuls=4, make_inputs=dpo_inputs,
                  third_party={"liger": third_party.liger_dpo, "trl": third_party.trl_dpo}),
}
