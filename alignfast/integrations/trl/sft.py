"""`SFTTrainer`: its fused-LM-head call served by alignfast.

Seam: `SFTTrainer.compute_loss` calls `model(**inputs, fused_lm_head=True)` and builds the loss
("nll", "dft") from the per-token `log_probs`; `entropy` and `is_top1` feed the `entropy` and
`mean_token_accuracy` metrics. Everything else (data, collation, loss types, normalisation by
`num_items_in_batch`, the MoE aux loss, metrics) stays TRL's.

Not covered: label smoothing and `compute_loss_func` (TRL computes those from full logits and uses the
fused call only for metrics, which this still serves); Ulysses sequence parallelism (its loss comes from
the model's own forward).
"""
from __future__ import annotations

from trl import SFTTrainer

from alignfast.integrations.trl.fused_head import HeadSpec, install

__all__ = ["AlignfastSFTTrainer", "head_specs"]


def head_specs(trainer: SFTTrainer) -> list:
    """The policy's head, with the outputs `SFTTrainer` gives `add_fused_lm_head`."""
    return [(trainer.model, HeadSpec(("log_probs", "entropy", "is_top1")))]


class AlignfastSFTTrainer(SFTTrainer):
    """`trl.SFTTrainer` whose log-probs come from alignfast. Extra keyword: `alignfast_options` (dict)."""

    def __init__(self, *args, alignfast_options: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        install(self, head_specs(self), alignfast_options or {})
