"""`KTOTrainer`: its fused-LM-head calls, on the policy and the reference model, served by alignfast.

Seam: `KTOTrainer._compute_loss` calls `model(**inputs, labels=completion_labels, fused_lm_head=True)`
and sums the per-token `log_probs` of each completion; `_compute_kl_logps` makes the same call on the
mismatched (KL) completions, without gradient, on the policy and on the reference model (or the policy
with its adapter disabled). The policy's call also returns `entropy` and `mean_logits` (metrics).
The loss types ("kto", "apo_zero_unpaired"), the KL estimate, the desirable/undesirable weights and
the metrics stay TRL's.

Not covered: with `precompute_ref_log_probs=True`, the train set's reference log-probs are computed in
`KTOTrainer.__init__`, before `use_alignfast` can apply (so by TRL's head; `AlignfastKTOTrainer` too).
"""
from __future__ import annotations

from trl import KTOTrainer

from alignfast.integrations.trl.fused_head import HeadSpec, install

__all__ = ["AlignfastKTOTrainer", "head_specs"]


def head_specs(trainer: KTOTrainer) -> list:
    """Policy and reference heads, with the outputs `KTOTrainer` gives `add_fused_lm_head`."""
    specs = [(trainer.model, HeadSpec(("log_probs", "entropy", "mean_logits")))]
    if trainer.ref_model is not None:
        specs.append((trainer.accelerator.unwrap_model(trainer.ref_model), HeadSpec()))
    return specs


class AlignfastKTOTrainer(KTOTrainer):
    """`trl.KTOTrainer` whose log-probs come from alignfast. Extra keyword: `alignfast_options` (dict)."""

    def __init__(self, *args, alignfast_options: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        install(self, head_specs(self), alignfast_options or {})
