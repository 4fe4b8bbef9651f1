"""`DPOTrainer`: its fused-LM-head calls, on the policy and the reference model, served by alignfast.

Seam: `DPOTrainer._compute_loss` (and `compute_ref_log_probs`) call
`model(**inputs, labels=completion_labels, fused_lm_head=True)` on the concatenated [chosen; rejected]
batch and sum the per-token `log_probs` into sequence log-probs; the reference model (or the policy
with its adapter disabled) answers the same call. The policy's call also returns `entropy`,
`mean_logits` and `is_top1` (metrics) and, with `use_weighting` (WPO), `log_sum_sq_probs`.
Every loss type, `ld_alpha`, the f-divergences, the weights and the metrics stay TRL's.

Not covered: with `precompute_ref_log_probs=True`, the train set's reference log-probs are computed in
`DPOTrainer.__init__`, before `use_alignfast` can apply (so by TRL's head; `AlignfastDPOTrainer` too).
"""
from __future__ import annotations

from trl import DPOTrainer

from alignfast.integrations.trl.fused_head import HeadSpec, install

__all__ = ["AlignfastDPOTrainer", "head_specs"]


def head_specs(trainer: DPOTrainer) -> list:
    """Policy and reference heads, with the outputs `DPOTrainer` gives `add_fused_lm_head`."""
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
    if trainer.use_weighting:
        outputs += ("log_sum_sq_probs",)
    specs = [(trainer.model, HeadSpec(outputs))]
    if trainer.ref_model is not None:
        specs.append((trainer.accelerator.unwrap_model(trainer.ref_model), HeadSpec()))
    return specs


class AlignfastDPOTrainer(DPOTrainer):
    """`trl.DPOTrainer` whose log-probs come from alignfast. Extra keyword: `alignfast_options` (dict)."""

    def __init__(self, *args, alignfast_options: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        install(self, head_specs(self), alignfast_options or {})
