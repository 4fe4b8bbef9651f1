"""KTO: Kahneman-Tversky Optimization on unpaired desirable / undesirable completions.

Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic Optimization", ICML 2024,
https://arxiv.org/abs/2402.01306, Eq. 7 (as TRL's KTOTrainer computes it). With the log-ratio
u = log π(y|x) − log π_ref(y|x) and the reference point z₀ = KL(π ‖ π_ref), estimated on
mismatched (x, y') pairs and detached:

    desirable   (label True):   l = λ_D·(1 − σ(β·(u − z₀)))
    undesirable (label False):  l = λ_U·(1 − σ(β·(z₀ − u)))

``apo_zero_unpaired`` (D'Oosterlinck et al. 2024, https://arxiv.org/abs/2408.06266, Eq. 7
unpaired) drops the reference point: desirable 1 − σ(β·u), undesirable σ(β·u).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from alignfast.losses._validation import (check_binary, check_choice, check_finite, check_floats,
                                          check_nonnegative, check_positive, compute_dtype)

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kto_kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, *,
                    gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """KTO's reference point z₀: clamp(mean(log π − log π_ref), min=0), detached.

    The log-probs are those of mismatched pairs (x_i, y_j), i ≠ j (TRL's ``KL_*`` batch), so the mean
    estimates KL(π ‖ π_ref) without the preference signal. In distributed training each process
    holds part of the batch: TRL averages the per-process means across processes
    (``accelerator.gather_for_metrics(kl).mean()``) before clamping. Pass that all-gather as
    `gather` (a callable taking the local 0-dim mean, returning the gathered means [world]) to
    reproduce it; without it the estimate is this process's.

    Args:
        policy_kl_logps: [N] log π of the mismatched completions.
        ref_kl_logps: [N] log π_ref of the same.

    Returns:
        0-dim tensor ≥ 0 (float32, float64 for float64 inputs), no gradient. An empty batch gives 0.
    """
    check_floats({"policy_kl_logps": policy_kl_logps, "ref_kl_logps": ref_kl_logps}, ndim=1)
    dtype = compute_dtype(policy_kl_logps, ref_kl_logps)
    with torch.no_grad():
        diff = policy_kl_logps.detach().to(dtype) - ref_kl_logps.detach().to(dtype)
        kl = diff.mean() if diff.numel() else diff.new_zeros(())
        if gather is not None:
            kl = gather(kl).mean()
        return kl.clamp(min=0)


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor,
             kl: torch.Tensor | float | None, *, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0, loss_type: str = "kto"
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example KTO losses in the batch's order, and the rewards of each subset.

    Args:
        policy_logps: [B] log π(y|x) summed over the completion tokens.
        ref_logps: [B] log π_ref(y|x) (constant).
        labels: [B] bool (or 0/1 integers): True for desirable completions.
        kl: the reference point z₀ (a float or 0-dim tensor, e.g. from `kto_kl_estimate`); it is
            detached here. Unused, and may be None, for ``apo_zero_unpaired``.
        beta: β > 0.
        desirable_weight, undesirable_weight: λ_D, λ_U ≥ 0.
        loss_type: ``"kto"`` or ``"apo_zero_unpaired"``.

    Returns:
        (losses [B], chosen_rewards [n_desirable], rejected_rewards [n_undesirable]): losses in the
        input order (TRL concatenates desirable then undesirable; the mean is the same),
        rewards β·u detached, in input order within each subset. A batch without desirable (or
        undesirable) examples gives an empty reward tensor and no NaN.
    """
    check_positive("beta", beta)
    check_nonnegative("desirable_weight", desirable_weight)
    check_nonnegative("undesirable_weight", undesirable_weight)
    check_choice("loss_type", loss_type, KTO_LOSS_TYPES)
    check_floats({"policy_logps": policy_logps, "ref_logps": ref_logps}, ndim=1)
    check_binary("labels", labels)
    if labels.shape != policy_logps.shape:
        raise ValueError(f"labels {tuple(labels.shape)} does not match policy_logps {tuple(policy_logps.shape)}")
    if labels.device != policy_logps.device:
        raise ValueError(f"labels is on {labels.device} but policy_logps is on {policy_logps.device}")
    if loss_type == "kto":
        if kl is None:
            raise ValueError("kl is required for loss_type='kto' (e.g. kto_kl_estimate(...), or 0.0)")
        if isinstance(kl, torch.Tensor):
            if kl.numel() != 1 or not bool(torch.isfinite(kl).all()):
                raise ValueError(f"kl must be a finite float or one-element tensor, got {kl!r}")
        else:
            check_finite("kl", kl)
    dtype = compute_dtype(policy_logps, ref_logps)
    desirable = labels.bool()
    logratios = policy_logps.to(dtype) - ref_logps.detach().to(dtype)
    if loss_type == "kto":
        z0 = kl.detach().to(device=logratios.device, dtype=dtype).reshape(()) if isinstance(kl, torch.Tensor) \
            else float(kl)
        chosen = 1.0 - torch.sigmoid(beta * (logratios - z0))
        rejected = 1.0 - torch.sigmoid(beta * (z0 - logratios))
    else:
        chosen = 1.0 - torch.sigmoid(beta * logratios)
        rejected = torch.sigmoid(beta * logratios)
    losses = torch.where(desirable, desirable_weight * chosen, undesirable_weight * rejected)
    rewards = beta * logratios.detach()
    return losses, rewards[desirable], rewards[~desirable]
