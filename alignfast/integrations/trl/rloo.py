"""`RLOOTrainer`: its fused-LM-head calls, on the policy and the reference model, served by alignfast.

Seam: as `GRPOTrainer`'s (`_get_per_token_logps_and_entropies` calls `model(..., labels=completion_labels,
fused_lm_head=True)` for the policy with gradient, and for the old policy and the reference model without),
at TRL's `temperature`, in the head's dtype (RLOO has no `cast_lm_head_to_fp32`). Generation, rewards, the
leave-one-out baseline, the loss, the KL term and the metrics stay TRL's.
"""
from __future__ import annotations

from trl import RLOOTrainer

from alignfast.integrations.trl.fused_head import HeadSpec, install

__all__ = ["AlignfastRLOOTrainer", "head_specs"]


def head_specs(trainer: RLOOTrainer) -> list:
    """Policy and reference heads, with the temperature and outputs `RLOOTrainer` gives `add_fused_lm_head`."""
    specs = [(trainer.model, HeadSpec(("log_probs", "entropy"), trainer.temperature))]
    if trainer.ref_model is not None:
        specs.append((trainer.accelerator.unwrap_model(trainer.ref_model), HeadSpec(("log_probs",), trainer.temperature)))
    return specs


class AlignfastRLOOTrainer(RLOOTrainer):
    """`trl.RLOOTrainer` whose log-probs come from alignfast. Extra keyword: `alignfast_options` (dict)."""

    def __init__(self, *args, alignfast_options: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        install(self, head_specs(self), alignfast_options or {})
