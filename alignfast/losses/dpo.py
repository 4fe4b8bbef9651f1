"""Direct Preference Optimization and its variants, one small function per loss type.

Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
NeurIPS 2023, https://arxiv.org/abs/2305.18290. From sequence log-probs (summed over the
completion tokens) of the policy π and the frozen reference π_ref:

    chosen_logratio   u_c = log π(y_c|x) − log π_ref(y_c|x)
    rejected_logratio u_r = log π(y_r|x) − log π_ref(y_r|x)
    DPO (sigmoid):    l = −log σ(β·(u_c − u_r))

Each loss type below is a function of `PairTerms` registered in `DPO_LOSSES`; adding one is one
function. The formulas and defaults follow TRL 1.16's `DPOTrainer` (each function's docstring
names its paper). With an f-divergence regulariser (Wang et al., "Beyond Reverse KL:
Generalizing Direct Preference Optimization with Diverse Divergence Constraints", ICLR 2024,
https://arxiv.org/abs/2309.16240) the log-ratios u are replaced by scores f'(π/π_ref) in the
loss types built on the chosen − rejected difference (`F_DIVERGENCE_LOSS_TYPES`):

    reverse_kl        f'(t) = log t                                   (u itself: standard DPO)
    forward_kl        f'(t) = 1 − 1/t                     = 1 − exp(−u)
    js_divergence     f'(t) = log(2t/(t + 1))             = log 2 + log σ(u)
    alpha_divergence  f'(t) = (t^(α−1) − 1)/(α − 1)       = (exp((α−1)·u) − 1)/(α − 1)   (α → 1: reverse_kl)

The implicit rewards returned beside the losses are β·u, detached, whatever the loss type.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alignfast.losses._validation import (check_choice, check_finite, check_floats, check_label_smoothing,
                                          check_lengths, check_positive, compute_dtype, is_real)
from alignfast.losses._numerics import capped_expm1
from alignfast.losses._reductions import batch_mean


@dataclass(frozen=True)
class PairTerms:
    """Everything a DPO-family loss reads; every tensor is [B] in the compute dtype."""

    chosen_logratios: torch.Tensor  # u_c = log π(y_c) − log π_ref(y_c)
    rejected_logratios: torch.Tensor  # u_r
    chosen_scores: torch.Tensor  # f'(π/π_ref) at y_c (= u_c for reverse_kl)
    rejected_scores: torch.Tensor  # f'(π/π_ref) at y_r
    policy_chosen: torch.Tensor  # log π(y_c)
    policy_rejected: torch.Tensor  # log π(y_r)
    ref_chosen: torch.Tensor  # log π_ref(y_c)
    ref_rejected: torch.Tensor  # log π_ref(y_r)
    chosen_lengths: torch.Tensor | None  # |y_c| in tokens (ipo, sigmoid_norm)
    rejected_lengths: torch.Tensor | None  # |y_r|
    beta: float
    label_smoothing: float
    discopop_tau: float
    bco_running_mean: torch.Tensor | float | None

    @property
    def delta(self) -> torch.Tensor:
        """score_c − score_r (= u_c − u_r for reverse_kl)."""
        return self.chosen_scores - self.rejected_scores

    def length_normalised_delta(self) -> torch.Tensor:
        """score_c/|y_c| − score_r/|y_r|, each length clamped at 1."""
        return (self.chosen_scores / self.chosen_lengths.clamp(min=1.0)
                - self.rejected_scores / self.rejected_lengths.clamp(min=1.0))


DPO_LOSSES: dict[str, Callable[[PairTerms], torch.Tensor]] = {}
F_DIVERGENCE_LOSS_TYPES: set[str] = set()  # loss types that accept a non-reverse_kl f_divergence
LENGTH_NORMALISED_LOSS_TYPES: set[str] = set()  # loss types that need chosen_lengths / rejected_lengths


def register_dpo_loss(name: str, *, f_divergence: bool = False, needs_lengths: bool = False):
    """Decorator adding `fn(PairTerms) -> losses [B]` to `DPO_LOSSES` under `name`."""

    def add(fn: Callable[[PairTerms], torch.Tensor]) -> Callable[[PairTerms], torch.Tensor]:
        DPO_LOSSES[name] = fn
        if f_divergence:
            F_DIVERGENCE_LOSS_TYPES.add(name)
        if needs_lengths:
            LENGTH_NORMALISED_LOSS_TYPES.add(name)
        return fn

    return add


def _smoothed_sigmoid(logits: torch.Tensor, eps: float) -> torch.Tensor:
    """−(1 − ε)·log σ(z) − ε·log σ(−z): the logistic loss on labels flipped with probability ε."""
    return -(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


# ---------------------------------------------------------------------------------------------
# the loss types
# ---------------------------------------------------------------------------------------------
@register_dpo_loss("sigmoid", f_divergence=True)
def _sigmoid(t: PairTerms) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, Eq. 7): −log σ(β·Δ). With label_smoothing ε > 0, conservative DPO
    (cDPO, Mitchell 2023, https://ericmitchell.ai/cdpo.pdf): −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)."""
    return _smoothed_sigmoid(t.beta * t.delta, t.label_smoothing)


@register_dpo_loss("hinge", f_divergence=True)
def _hinge(t: PairTerms) -> torch.Tensor:
    """SLiC (Zhao et al. 2023, https://arxiv.org/abs/2305.10425): max(0, 1 − β·Δ)."""
    return torch.relu(1.0 - t.beta * t.delta)


@register_dpo_loss("ipo", f_divergence=True, needs_lengths=True)
def _ipo(t: PairTerms) -> torch.Tensor:
    """IPO (Azar et al. 2023, https://arxiv.org/abs/2310.12036, Eq. 17) with β as τ:
    (Δ̄ − 1/(2β))², Δ̄ the length-normalised difference score_c/|y_c| − score_r/|y_r| (as TRL, per the IPO authors)."""
    return (t.length_normalised_delta() - 1.0 / (2.0 * t.beta)).square()


@register_dpo_loss("exo_pair", f_divergence=True)
def _exo_pair(t: PairTerms) -> torch.Tensor:
    """EXO-pref (Ji et al. 2024, https://arxiv.org/abs/2402.00856, Eq. 16): KL(p_θ ‖ p_label) over the pair, with
    p_θ = (σ(βΔ), σ(−βΔ)) and p_label = (1 − ε, ε), ε = label_smoothing > 0:
    σ(βΔ)·(log σ(βΔ) − log(1−ε)) + σ(−βΔ)·(log σ(−βΔ) − log ε)."""
    z, eps = t.beta * t.delta, t.label_smoothing
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))


@register_dpo_loss("nca_pair")
def _nca_pair(t: PairTerms) -> torch.Tensor:
    """NCA (Chen et al. 2024, https://arxiv.org/abs/2402.05369), with rewards r = β·u:
    −log σ(r_c) − ½·log σ(−r_c) − ½·log σ(−r_r)."""
    rc, rr = t.beta * t.chosen_logratios, t.beta * t.rejected_logratios
    return -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)


@register_dpo_loss("robust", f_divergence=True)
def _robust(t: PairTerms) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, https://arxiv.org/abs/2403.00409, Eq. 21), labels flipped w.p. ε:
    (−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)) / (1 − 2ε)."""
    z, eps = t.beta * t.delta, t.label_smoothing
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


@register_dpo_loss("bco_pair")
def _bco_pair(t: PairTerms) -> torch.Tensor:
    """BCO (Jung et al. 2024, https://arxiv.org/abs/2404.04656), rewards r = β·u and reward shift δ:
    −log σ(r_c − δ) − log σ(−(r_r − δ)).

    δ is the running mean of the rewards; `bco_running_mean=None` takes the mean of this batch's
    chosen and rejected rewards (detached), which is what a running mean started on this batch
    holds. TRL 1.16's DPOTrainer uses δ = 0: pass ``bco_running_mean=0.0`` to reproduce it."""
    rc, rr = t.beta * t.chosen_logratios, t.beta * t.rejected_logratios
    shift = t.bco_running_mean
    if shift is None:
        shift = batch_mean(torch.cat((rc, rr))).detach()
    return -F.logsigmoid(rc - shift) - F.logsigmoid(-(rr - shift))


@register_dpo_loss("sppo_hard")
def _sppo_hard(t: PairTerms) -> torch.Tensor:
    """SPPO with hard win probabilities (Wu et al. 2024, https://arxiv.org/abs/2405.00675, Eq. 4.7 with P = 1/0):
    (u_c − 1/(2β))² + (u_r + 1/(2β))²."""
    half = 0.5 / t.beta
    return (t.chosen_logratios - half).square() + (t.rejected_logratios + half).square()


def _aot(delta: torch.Tensor, t: PairTerms) -> torch.Tensor:
    return _smoothed_sigmoid(t.beta * delta, t.label_smoothing)


@register_dpo_loss("aot")
def _aot_paired(t: PairTerms) -> torch.Tensor:
    """AOT, paired (Melnyk et al. 2024, https://arxiv.org/abs/2406.05882): the logistic loss on the difference of
    the batch-sorted policy margins log π(y_c) − log π(y_r) and the batch-sorted reference margins."""
    policy = torch.sort(t.policy_chosen - t.policy_rejected, stable=True).values
    ref = torch.sort(t.ref_chosen - t.ref_rejected, stable=True).values
    return _aot(policy - ref, t)


@register_dpo_loss("aot_unpaired")
def _aot_unpaired(t: PairTerms) -> torch.Tensor:
    """AOT, unpaired (Melnyk et al. 2024): the logistic loss on sorted(u_c) − sorted(u_r) over the batch."""
    chosen = torch.sort(t.chosen_logratios, stable=True).values
    rejected = torch.sort(t.rejected_logratios, stable=True).values
    return _aot(chosen - rejected, t)


@register_dpo_loss("apo_zero")
def _apo_zero(t: PairTerms) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, https://arxiv.org/abs/2408.06266, Eq. 7): push the chosen likelihood up
    and the rejected down: (1 − σ(β·u_c)) + σ(β·u_r)."""
    return 1.0 - torch.sigmoid(t.beta * t.chosen_logratios) + torch.sigmoid(t.beta * t.rejected_logratios)


@register_dpo_loss("apo_down")
def _apo_down(t: PairTerms) -> torch.Tensor:
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8): push both down, the rejected more:
    σ(β·u_c) + (1 − σ(β·(u_c − u_r)))."""
    return (torch.sigmoid(t.beta * t.chosen_logratios)
            + 1.0 - torch.sigmoid(t.beta * (t.chosen_logratios - t.rejected_logratios)))


@register_dpo_loss("discopop", f_divergence=True)
def _discopop(t: PairTerms) -> torch.Tensor:
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, https://arxiv.org/abs/2406.08414, Eq. 5), z = βΔ:
    (1 − σ(z/τ))·(−log σ(z)) + σ(z/τ)·exp(−z)."""
    z = t.beta * t.delta
    weight = torch.sigmoid(z / t.discopop_tau)
    # σ(z/τ)·exp(−z) as exp(log σ(z/τ) − z): the product form is 0·inf = NaN once exp(−z) overflows
    return (1.0 - weight) * -F.logsigmoid(z) + torch.exp(F.logsigmoid(z / t.discopop_tau) - z)


@register_dpo_loss("sigmoid_norm", f_divergence=True, needs_lengths=True)
def _sigmoid_norm(t: PairTerms) -> torch.Tensor:
    """Length-normalised DPO (as TRL's sigmoid_norm; cf. SimPO's averaging, Meng et al. 2024):
    −log σ(β·(score_c/|y_c| − score_r/|y_r|))."""
    return -F.logsigmoid(t.beta * t.length_normalised_delta())


# ---------------------------------------------------------------------------------------------
# f-divergence scores
# ---------------------------------------------------------------------------------------------
def _alpha_scores(logratios: torch.Tensor, alpha: float) -> torch.Tensor:
    if abs(alpha - 1.0) < 1e-6:  # the α → 1 limit is log t: reverse KL
        return logratios
    return capped_expm1((alpha - 1.0) * logratios) / (alpha - 1.0)


F_DIVERGENCES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "reverse_kl": lambda u, alpha: u,
    "forward_kl": lambda u, alpha: -capped_expm1(-u),
    "js_divergence": lambda u, alpha: math.log(2.0) + F.logsigmoid(u),
    "alpha_divergence": _alpha_scores,
}


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0, f_divergence: str = "reverse_kl",
             f_alpha_divergence_coef: float = 0.5, chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None, discopop_tau: float = 0.05,
             bco_running_mean: torch.Tensor | float | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO-family losses and the implicit rewards.

    Args:
        policy_chosen_logps: [B] log π(y_c|x), summed over the completion tokens.
        policy_rejected_logps: [B] log π(y_r|x).
        ref_chosen_logps: [B] log π_ref(y_c|x) (treated as constant).
        ref_rejected_logps: [B] log π_ref(y_r|x) (treated as constant).
        beta: β > 0 (τ for ipo).
        loss_type: a key of `DPO_LOSSES`: sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard,
            aot, aot_unpaired, apo_zero, apo_down, discopop, sigmoid_norm.
        label_smoothing: ε ∈ [0, 0.5): cDPO's ε for sigmoid, the flip rate for robust, EXO's ε for exo_pair
            (must be > 0 there), the smoothing of aot/aot_unpaired; unused by the other types.
        f_divergence: reverse_kl (standard), forward_kl, js_divergence or alpha_divergence; the non-default
            ones only for the loss types in `F_DIVERGENCE_LOSS_TYPES`.
        f_alpha_divergence_coef: α of alpha_divergence (TRL's default 0.5).
        chosen_lengths, rejected_lengths: [B] completion token counts; required by ipo and sigmoid_norm.
        discopop_tau: τ > 0 of discopop.
        bco_running_mean: δ of bco_pair (float or 0-dim tensor); None: this batch's mean reward.

    Returns:
        (losses [B], chosen_rewards [B], rejected_rewards [B]); losses in float32 (float64 for
        float64 inputs), rewards β·(log π − log π_ref) detached. Average the losses yourself.
    """
    check_positive("beta", beta)
    check_label_smoothing(label_smoothing)
    check_choice("loss_type", loss_type, DPO_LOSSES)
    check_choice("f_divergence", f_divergence, F_DIVERGENCES)
    check_finite("f_alpha_divergence_coef", f_alpha_divergence_coef)
    check_positive("discopop_tau", discopop_tau)
    if f_divergence != "reverse_kl" and loss_type not in F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(f"f_divergence={f_divergence!r} is only valid for loss_type in "
                         f"{sorted(F_DIVERGENCE_LOSS_TYPES)}, got loss_type={loss_type!r}")
    if loss_type == "exo_pair" and label_smoothing == 0.0:
        raise ValueError("loss_type='exo_pair' needs label_smoothing > 0 (the EXO paper recommends 1e-3)")
    check_floats({"policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps,
                  "ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}, ndim=1)
    batch, device = policy_chosen_logps.shape[0], policy_chosen_logps.device
    if loss_type in LENGTH_NORMALISED_LOSS_TYPES:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"loss_type={loss_type!r} length-normalises: pass chosen_lengths and rejected_lengths "
                             f"([B] token counts), got chosen_lengths={_describe(chosen_lengths)}, "
                             f"rejected_lengths={_describe(rejected_lengths)}")
    for name, lengths in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if lengths is not None:
            check_lengths(name, lengths, batch, device)
    if bco_running_mean is not None and not (
            isinstance(bco_running_mean, torch.Tensor) and bco_running_mean.dim() == 0
            and bool(torch.isfinite(bco_running_mean))
            or is_real(bco_running_mean) and math.isfinite(bco_running_mean)):
        raise ValueError(f"bco_running_mean must be a finite float or 0-dim tensor, got {bco_running_mean!r}")

    dtype = compute_dtype(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    pc, pr = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    rc, rr = ref_chosen_logps.detach().to(dtype), ref_rejected_logps.detach().to(dtype)
    chosen_logratios, rejected_logratios = pc - rc, pr - rr
    scores = F_DIVERGENCES[f_divergence]
    shift = bco_running_mean
    if isinstance(shift, torch.Tensor):
        shift = shift.detach().to(device=device, dtype=dtype)
    terms = PairTerms(
        chosen_logratios=chosen_logratios, rejected_logratios=rejected_logratios,
        chosen_scores=scores(chosen_logratios, f_alpha_divergence_coef),
        rejected_scores=scores(rejected_logratios, f_alpha_divergence_coef),
        policy_chosen=pc, policy_rejected=pr, ref_chosen=rc, ref_rejected=rr,
        chosen_lengths=None if chosen_lengths is None else chosen_lengths.to(dtype),
        rejected_lengths=None if rejected_lengths is None else rejected_lengths.to(dtype),
        beta=float(beta), label_smoothing=float(label_smoothing), discopop_tau=float(discopop_tau),
        bco_running_mean=shift,
    )
    losses = DPO_LOSSES[loss_type](terms)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def _describe(t) -> str:
    return "None" if t is None else f"shape {tuple(t.shape)}"
