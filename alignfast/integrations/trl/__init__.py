"""TRL's trainers with alignfast's fused log-probs: `use_alignfast(trainer)` or `Alignfast*Trainer`.

Supported: TRL >= 1.16, < 2 (tested with 1.16.0). In that range `SFTTrainer`, `DPOTrainer`, `KTOTrainer`,
`GRPOTrainer` and `RLOOTrainer` get every per-token log-prob through one call, `model(..., labels=..., fused_lm_head=True)`,
which TRL's `add_fused_lm_head` puts on the policy and reference models. That call is the one seam
alignfast replaces (`fused_head.py`): the same `FusedCausalLMOutput`, computed from the backbone's hidden
states and the output head by alignfast's kernels. Loss types, normalisation, metrics, generation and data
stay TRL's. Each trainer's file says what its call asks for and what is not covered.

    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
    use_alignfast(trainer, backend="auto")      # or AlignfastDPOTrainer(..., alignfast_options={...})
    trainer.train()
    revert(trainer)                              # TRL's own fused head again

`RewardTrainer` has no vocab projection (a [num_labels, H] score head on a sequence classifier), so
there is nothing to fuse: `use_alignfast` leaves it unchanged and warns.

Not covered anywhere: a sharded lm_head (FSDP2 DTensor, DeepSpeed ZeRO-3: a clear error), a LoRA adapter
on the lm_head (error), autocast (the head runs in the weight's dtype, accumulating in fp32).
"""
from __future__ import annotations

import warnings

from trl import DPOTrainer, GRPOTrainer, KTOTrainer, RewardTrainer, RLOOTrainer, SFTTrainer

from alignfast.integrations.trl import dpo, grpo, kto, rloo, sft
from alignfast.integrations.trl.dpo import AlignfastDPOTrainer
from alignfast.integrations.trl.fused_head import OPTIONS, SUPPORTED_TRL, check_options, install, uninstall
from alignfast.integrations.trl.grpo import AlignfastGRPOTrainer
from alignfast.integrations.trl.kto import AlignfastKTOTrainer
from alignfast.integrations.trl.rloo import AlignfastRLOOTrainer
from alignfast.integrations.trl.sft import AlignfastSFTTrainer

__all__ = ["use_alignfast", "revert", "SUPPORTED_TRL", "OPTIONS", "AlignfastSFTTrainer",
           "AlignfastDPOTrainer", "AlignfastKTOTrainer", "AlignfastGRPOTrainer", "AlignfastRLOOTrainer"]

# TRL trainer class -> the heads (model, HeadSpec) its fused-LM-head calls go through.
_HEAD_SPECS = {SFTTrainer: sft.head_specs, DPOTrainer: dpo.head_specs, KTOTrainer: kto.head_specs,
               GRPOTrainer: grpo.head_specs, RLOOTrainer: rloo.head_specs}
# ... and the methods that make those calls: a subclass overriding one may make none (TRL's experimental
# GKD and GOLD trainers subclass SFTTrainer with a loss of their own).
_FUSED_CALLERS = {SFTTrainer: ("compute_loss",), DPOTrainer: ("_compute_loss",),
                  KTOTrainer: ("_compute_loss", "_compute_kl_logps"),
                  GRPOTrainer: ("_get_per_token_logps_and_entropies",),
                  RLOOTrainer: ("_get_per_token_logps_and_entropies",)}


def use_alignfast(trainer, **options):
    """Serve `trainer`'s fused-LM-head calls (policy and reference model) with alignfast; returns `trainer`.

    `options`: `backend`, `chunk_size` (tokens per block) of the fused op. Applying again replaces them.
    Undo with `revert(trainer)`.
    """
    check_options(options)
    if isinstance(trainer, RewardTrainer):
        warnings.warn("alignfast: RewardTrainer has no vocab projection (its score head is [num_labels, H]), "
                      "so there is nothing to fuse; the trainer is left unchanged", UserWarning, stacklevel=2)
        return trainer
    for cls, head_specs in _HEAD_SPECS.items():
        if isinstance(trainer, cls):
            install(trainer, head_specs(trainer), options)
            own = [m for m in _FUSED_CALLERS[cls] if getattr(type(trainer), m) is not getattr(cls, m)]
            if own:
                warnings.warn(f"alignfast: {type(trainer).__name__} overrides {cls.__name__}."
                              f"{', '.join(own)}, where TRL makes the fused-LM-head calls alignfast serves; "
                              f"if its own loss makes none, nothing changes", UserWarning, stacklevel=2)
            return trainer
    supported = ", ".join(f"trl.{cls.__name__}" for cls in (*_HEAD_SPECS, RewardTrainer))
    raise TypeError(f"use_alignfast supports {supported}; got {type(trainer).__name__}")


def revert(trainer):
    """TRL's own fused heads again, exactly. No-op where `use_alignfast` was not applied."""
    for name in ("model", "ref_model"):
        model = getattr(trainer, name, None)
        if model is not None:
            uninstall(trainer.accelerator.unwrap_model(model) if hasattr(trainer, "accelerator") else model)
    return trainer
