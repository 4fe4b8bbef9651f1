"""`GRPOTrainer`: its fused-LM-head calls, on the policy and the reference model, served by alignfast.

Seam: `GRPOTrainer._get_per_token_logps_and_entropies` calls
`model(input_ids=..., attention_mask=..., labels=completion_labels, fused_lm_head=True)` for the policy
(log-probs and entropies, with gradient, in `_compute_loss`), for the old policy and for the reference
model (no gradient, in `_generate_and_score_completions`). The log-probs are those of the logits divided
by `temperature`, in fp32 with `cast_lm_head_to_fp32`, exactly as TRL's head computes them. Generation,
rewards, advantages, every loss type, the KL term, the entropy bonus and mask, and the metrics stay TRL's.

Not covered: generation with vLLM (its sampling log-probs come from vLLM; the training-side log-probs
are still served here).
"""
from __future__ import annotations

from trl import GRPOTrainer

from alignfast.integrations.trl.fused_head import HeadSpec, install

__all__ = ["AlignfastGRPOTrainer", "head_specs"]


def head_specs(trainer: GRPOTrainer) -> list:
    """Policy and reference heads, with the temperature and outputs `GRPOTrainer` gives
    `add_fused_lm_head`."""
    fp32 = bool(trainer.args.cast_lm_head_to_fp32)
    specs = [(trainer.model, HeadSpec(("log_probs", "entropy"), trainer.temperature, fp32))]
    if trainer.ref_model is not None:
        specs.append((trainer.accelerator.unwrap_model(trainer.ref_model),
                      HeadSpec(("log_probs",), trainer.temperature, fp32)))
    return specs


class AlignfastGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` whose log-probs come from alignfast. Extra keyword: `alignfast_options` (dict)."""

    def __init__(self, *args, alignfast_options: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        install(self, head_specs(self), alignfast_options or {})
