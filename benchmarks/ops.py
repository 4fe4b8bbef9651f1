"""The ops under benchmark. Adding an op is one `OpSpec` entry in `OPS`.

An op maps an input dict (from `make_inputs`) to either a per-token tensor [N] (backward with a
random upstream gradient: `(out * upstream).sum().backward()`) or a scalar loss (`.backward()`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
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
    """hidden [N, H], weight [V, H] (both requiring grad), targets [N] in [0, V), upstream [N] fp32; drawn on
    `device` (a GPU case would spend seconds drawing a 128k-row head on the CPU)."""
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, device=device) / h**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g, device=device)
    upstream = torch.randn(n, generator=g, device=device)
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
    g = torch.Generator(device=device).manual_seed(seed + 2)
    with torch.no_grad():
        w = weight.float()
        direction = w[targets] / w[targets].norm(dim=1, keepdim=True).square()
        noise = 2.5 * torch.randn(n, h, generator=g, device=device)
        hidden = (16.0 * direction + noise - (noise * w[targets]).sum(1, keepdim=True) * direction)
        inputs.args["hidden"] = hidden.to(dtype).requires_grad_()
    inputs.params[0] = inputs.args["hidden"]
    return inputs


# CCE's rule (skip where p < 2⁻¹²), in the units of dL/dz: a mean over N tokens scales p by 1/N
def filtered_cross_entropy(hidden, weight, targets, backend):
    return alignfast.linear_cross_entropy(hidden, weight, targets, backend=backend,
                                          grad_filter_eps=2.0**-12 / targets.numel())


def sequence_inputs(n: int, h: int, v: int, dtype: torch.dtype, device: torch.device, seed: int = 0, *,
                    reference: bool = False, advantages: str | None = None,
                    desirable: bool = False) -> Inputs:
    """n tokens as B sequences of `seq_len` (512, or n/4 when small), every token a target; a paired
    loss reads the first B/2 as the chosen completions, the rest as the rejected ones.

    reference: a frozen reference model's hidden states and head (no gradient).
    advantages: "token" ([B, T], PPO) or "sequence" ([B], GRPO) random fp32 advantages, with fp32
        old_logprobs [B, T] within ~0.1 of the policy's own (ratios near 1, a few of them clipped).
    desirable: KTO's [B] labels (alternating, both kinds present) and its given reference point kl.
    """
    seq_len = 512 if n >= 2048 else max(n // 4, 1)
    inputs = head_inputs(n, h, v, dtype, device, seed)
    args = inputs.args
    args["seq_len"] = seq_len
    if reference:
        g = torch.Generator(device=device).manual_seed(seed + 1)
        args["ref_hidden"] = torch.randn(n, h, generator=g, device=device).to(dtype)
        args["ref_weight"] = (torch.randn(v, h, generator=g, device=device) / h**0.5).to(dtype)
    if advantages:
        g = torch.Generator(device=device).manual_seed(seed + 2)
        with torch.no_grad():   # row blocks: no [N, V] logits here
            logps = torch.cat([naive_logprobs(x, args["weight"], t)
                               for x, t in zip(args["hidden"].split(1024), args["targets"].split(1024))])
        noise = 0.1 * torch.randn(n, generator=g, device=device)
        args["old_logprobs"] = (logps.float() + noise).view(-1, seq_len)
        shape = (n // seq_len, seq_len) if advantages == "token" else (n // seq_len,)
        args["advantages"] = torch.randn(shape, generator=g, device=device)
    if desirable:
        args["desirable"] = torch.arange(n // seq_len, device=device) % 2 == 0
        args["kl"] = 0.5   # z0 given: the KL batch's no-grad forward is left out of every impl
    return inputs


def as_sequences(seq_len, hidden, targets, ref_hidden=None, ref_weight=None):
    """[N, H] hidden and [N] targets as [B, T, H] and [B, T]; the reference as the modules' keywords."""
    h = hidden.shape[-1]
    refs = {} if ref_hidden is None else {"ref_hidden": ref_hidden.view(-1, seq_len, h),
                                          "ref_weight": ref_weight}
    return hidden.view(-1, seq_len, h), targets.view(-1, seq_len), refs


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


def naive_kl(hidden, weight, targets, ref_hidden, ref_weight, seq_len):
    """Per-token KL(π‖π_ref) over the vocabulary from both sides' materialised logits."""
    logp = (hidden @ weight.t()).float().log_softmax(-1)
    with torch.no_grad():
        logq = (ref_hidden @ ref_weight.t()).float().log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def fused_kl(hidden, weight, targets, ref_hidden, ref_weight, seq_len, backend, reduction="none"):
    return alignfast.linear_kl(hidden, weight, ref_hidden, ref_weight, backend=backend, reduction=reduction)


def naive_kl_mean(*args, **kwargs):
    return naive_kl(*args, **kwargs).mean()


def fused_dpo(hidden, weight, targets, ref_hidden, ref_weight, seq_len, backend, beta=0.1):
    h = hidden.shape[-1]
    loss, _ = alignfast.losses.LinearDPOLoss(beta=beta, backend=backend)(
        hidden.view(-1, seq_len, h), weight, targets.view(-1, seq_len),
        ref_hidden=ref_hidden.view(-1, seq_len, h), ref_weight=ref_weight)
    return loss


def logprob_loss(logprobs, formula, hidden, weight, targets, seq_len, ref_hidden=None, ref_weight=None,
                 **inputs):
    """`formula` on [B, T] token log-probs from `logprobs(hidden, weight, targets)`: naive's materialised
    logits, or another project's log-probs; the reference's (when the op has one) under no_grad."""
    ref = None
    if ref_hidden is not None:
        with torch.no_grad():
            ref = logprobs(ref_hidden, ref_weight, targets).view(-1, seq_len)
    return formula(logprobs(hidden, weight, targets).view(-1, seq_len), ref, **inputs)


def naive_loss(formula):
    return partial(logprob_loss, naive_logprobs, formula)


def trl_loss(formula):
    """The loss on TRL's chunked log-probs (`third_party.trl_logprobs`), the reference's under no_grad."""
    return partial(logprob_loss, third_party.trl_logprobs, formula)


# Each method's formula on the policy's [B, T] token log-probs `logps` and the reference's `ref` (None
# without one), through alignfast's functional losses (tested against TRL's formulas in tests/losses);
# every target counts (no ignored positions), so sums, means and the chosen NLL are plain reductions.
def kto_formula(logps, ref, desirable, kl, beta=0.1):
    return alignfast.losses.kto_loss(logps.sum(-1), ref.sum(-1), desirable, kl, beta=beta)[0].mean()


# PPO as verl's actor runs it with a KL loss: the clipped surrogate (clip 0.2, token-mean) + kl_coef times the
# k3 ("low_var_kl") KL to the reference; per-token advantages (GAE)
def ppo_formula(logps, ref, old_logprobs, advantages, kl_coef=0.05):
    mask = torch.ones_like(logps, dtype=torch.bool)
    return alignfast.losses.ppo_policy_loss(logps, old_logprobs, advantages, mask, ref_logprobs=ref,
                                            kl_coef=kl_coef, kl_estimator="k3", backend="torch")[0]


# GRPO as TRL's GRPOTrainer (loss_type "dapo", epsilon 0.2) with beta=0.04, the k3 KL to the reference:
# recent TRL defaults to beta=0 (no reference model); with one is the costlier row and Liger's default.
# The plain k3 (no ρ weighting: Liger's default, and the committed results'); the weighting costs nothing here.
GRPO_OPTIONS = dict(loss_type="dapo", use_bias_correction_kl=False)


def grpo_formula(logps, ref, old_logprobs, advantages, beta=0.04):
    mask = torch.ones_like(logps, dtype=torch.bool)
    return alignfast.losses.grpo_loss(logps, old_logprobs, ref, advantages, mask, beta=beta, backend="torch",
                                      **GRPO_OPTIONS)[0]


def simpo_formula(logps, ref, beta=2.0, gamma=0.5):
    return alignfast.losses.simpo_loss(*logps.mean(-1).chunk(2), beta=beta, gamma=gamma)[0].mean()


def chosen_nll(logps):
    return -logps[: logps.shape[0] // 2].mean()


def orpo_formula(logps, ref, beta=0.1):
    return alignfast.losses.orpo_loss(*logps.mean(-1).chunk(2), chosen_nll(logps), beta=beta)[0].mean()


def cpo_formula(logps, ref, beta=0.1):
    return alignfast.losses.cpo_loss(*logps.sum(-1).chunk(2), chosen_nll(logps), beta=beta)[0].mean()


# The same methods as alignfast's fused modules, configured as the formulas above.
def fused_kto(hidden, weight, targets, seq_len, ref_hidden, ref_weight, desirable, kl, backend, beta=0.1):
    hid, tgt, refs = as_sequences(seq_len, hidden, targets, ref_hidden, ref_weight)
    loss_fn = alignfast.losses.LinearKTOLoss(beta=beta, backend=backend)
    return loss_fn(hid, weight, tgt, desirable, kl=kl, **refs)[0]


# log_entropy=False: the entropy is a logged metric only (entropy_coef 0), which no other impl computes
def fused_ppo(hidden, weight, targets, seq_len, ref_hidden, ref_weight, old_logprobs, advantages, backend,
              kl_coef=0.05, kl_estimator="k3"):
    hid, tgt, refs = as_sequences(seq_len, hidden, targets, ref_hidden, ref_weight)
    loss_fn = alignfast.losses.LinearPPOLoss(kl_coef=kl_coef, kl_estimator=kl_estimator, log_entropy=False,
                                             backend=backend)
    return loss_fn(hid, weight, tgt, old_logprobs, advantages, **refs)[0]


def naive_ppo_full_kl(hidden, weight, targets, seq_len, ref_hidden, ref_weight, old_logprobs, advantages,
                      kl_coef=0.05):
    """PPO's clipped surrogate + kl_coef · the exact KL(π‖π_ref) over the vocabulary (token-mean), from
    both sides' materialised logits."""
    logp = (hidden @ weight.t()).float().log_softmax(-1)
    with torch.no_grad():
        logq = (ref_hidden @ ref_weight.t()).float().log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    lp = logp.gather(-1, targets[:, None]).view(-1, seq_len)
    mask = torch.ones_like(lp, dtype=torch.bool)
    return alignfast.losses.ppo_policy_loss(lp, old_logprobs, advantages, mask, backend="torch")[0] \
        + kl_coef * kl.mean()


def fused_grpo(hidden, weight, targets, seq_len, ref_hidden, ref_weight, old_logprobs, advantages, backend,
               beta=0.04):
    hid, tgt, refs = as_sequences(seq_len, hidden, targets, ref_hidden, ref_weight)
    loss_fn = alignfast.losses.LinearGRPOLoss(beta=beta, log_entropy=False, backend=backend, **GRPO_OPTIONS)
    return loss_fn(hid, weight, tgt, advantages, old_logprobs=old_logprobs, **refs)[0]


def fused_preference(module, hidden, weight, targets, seq_len, backend):
    """A reference-free preference module (`module(backend=...)`) on the pairs."""
    hid, tgt, _ = as_sequences(seq_len, hidden, targets)
    return module(backend=backend)(hid, weight, tgt)[0]


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
    # the full-vocabulary KL to a frozen reference (per token, any upstream gradient): the policy's
    # logits, grad_hidden, grad_weight and the reference's logits (alignfast recomputes both sides
    # in the backward: 6)
    "linear_kl": OpSpec(naive=naive_kl, fused=fused_kl, floor_matmuls=4,
                        make_inputs=partial(sequence_inputs, reference=True)),
    # its mean: every token's upstream gradient is known in the forward (the native backends: 4)
    "linear_kl_mean": OpSpec(naive=naive_kl_mean, fused=partial(fused_kl, reduction="mean"), floor_matmuls=4,
                             make_inputs=partial(sequence_inputs, reference=True)),
    # the same on peaked logits with grad_filter_eps: the two gradient products shrink to the vocab
    # columns that matter (fused impls only; naive and floor are the exact computation)
    "cross_entropy_filtered": OpSpec(naive=naive_cross_entropy, fused=filtered_cross_entropy, floor_matmuls=3,
                                     make_inputs=peaked_inputs,
                                     third_party={"cce": third_party.cce_filtered_cross_entropy}),
    # policy: logits, grad_hidden, grad_weight (the gradient is known per pair in the forward);
    # reference: logits only
    "dpo": OpSpec(naive=naive_dpo, fused=fused_dpo, floor_matmuls=4,
                  make_inputs=partial(sequence_inputs, reference=True),
                  third_party={"liger": third_party.liger_dpo, "trl": third_party.trl_dpo}),
    # policy 3 (each sequence's loss is known in the forward, z0 being given) + reference logits 1
    "kto": OpSpec(naive=naive_loss(kto_formula), fused=fused_kto, floor_matmuls=4,
                  make_inputs=partial(sequence_inputs, reference=True, desirable=True),
                  third_party={"liger": third_party.liger_kto, "trl": trl_loss(kto_formula)}),
    # policy 3 (a per-token loss: its gradient is known in the forward) + reference logits 1 (the KL).
    # No Liger: it has no PPO loss, and its GRPO loss takes one advantage per sequence, not per token
    "ppo": OpSpec(naive=naive_loss(ppo_formula), fused=fused_ppo, floor_matmuls=4,
                  make_inputs=partial(sequence_inputs, reference=True, advantages="token"),
                  third_party={"trl": trl_loss(ppo_formula)}),
    # the same with the exact KL over the vocabulary (kl_estimator="full"): its gradient rides along the
    # policy's (each token's weight is known up front), from a reference block beside the policy's: 4
    "ppo_full_kl": OpSpec(naive=naive_ppo_full_kl, fused=partial(fused_ppo, kl_estimator="full"), floor_matmuls=4,
                          make_inputs=partial(sequence_inputs, reference=True, advantages="token")),
    # policy 3 (a per-token loss) + reference logits 1 (the KL penalty, beta > 0)
    "grpo": OpSpec(naive=naive_loss(grpo_formula), fused=fused_grpo, floor_matmuls=4,
                   make_inputs=partial(sequence_inputs, reference=True, advantages="sequence"),
                   third_party={"liger": third_party.liger_grpo, "trl": trl_loss(grpo_formula)}),
    # reference-free: the policy's 3 only (each pair's loss is known in the forward); SimPO, ORPO, CPO alike
    "simpo": OpSpec(naive=naive_loss(simpo_formula), floor_matmuls=3, make_inputs=sequence_inputs,
                    fused=partial(fused_preference,
                                  partial(alignfast.losses.LinearSimPOLoss, beta=2.0, gamma=0.5)),
                    third_party={"liger": third_party.liger_simpo, "trl": trl_loss(simpo_formula)}),
    "orpo": OpSpec(naive=naive_loss(orpo_formula), floor_matmuls=3, make_inputs=sequence_inputs,
                   fused=partial(fused_preference, partial(alignfast.losses.LinearORPOLoss, beta=0.1)),
                   third_party={"liger": third_party.liger_orpo, "trl": trl_loss(orpo_formula)}),
    "cpo": OpSpec(naive=naive_loss(cpo_formula), floor_matmuls=3, make_inputs=sequence_inputs,
                  fused=partial(fused_preference, partial(alignfast.losses.LinearCPOLoss, beta=0.1)),
                  third_party={"liger": third_party.liger_cpo, "trl": trl_loss(cpo_formula)}),
}
