"""The README's "Coming from Liger-Kernel" table, row by row: each Liger-Kernel chunked loss, configured as
a user would port it, and its alignfast equivalent give the same loss and gradients on the same inputs."""
from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from alignfast.losses import (LinearCPOLoss, LinearDPOLoss, LinearGRPOLoss, LinearKTOLoss, LinearORPOLoss,
                              LinearSimPOLoss)

chunked_loss = pytest.importorskip("liger_kernel.chunked_loss")
H, V, T, B = 32, 100, 8, 6


def batch(seed=0):
    """[B, T] rows (chosen first, then rejected, for the pair losses) with prompts and padding ignored."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=g)
    for i in range(B):
        labels[i, :1 + i % 2] = -100
        labels[i, T - i % 3:] = -100
    return dict(hidden=torch.randn(B, T, H, generator=g), weight=torch.randn(V, H, generator=g) / H ** 0.5,
                ref_hidden=torch.randn(B, T, H, generator=g), ref_weight=torch.randn(V, H, generator=g) / H ** 0.5,
                labels=labels)


def run(fn, d):
    """fn(hidden, weight) -> loss; (loss, grad_hidden, grad_weight)."""
    h, w = d["hidden"].clone().requires_grad_(), d["weight"].clone().requires_grad_()
    loss = fn(h, w)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def liger_pair(cls, **kw):
    return lambda d: lambda h, w: cls(compiled=False, **kw)(w, h, d["labels"], ref_input=d["ref_hidden"],
                                                            ref_weight=d["ref_weight"])[0]


def liger_free(cls, **kw):
    return lambda d: lambda h, w: cls(compiled=False, **kw)(w, h, d["labels"])[0]


def ours_pair(cls, **kw):
    return lambda d: lambda h, w: cls(**kw)(h, w, d["labels"], ref_hidden=d["ref_hidden"],
                                            ref_weight=d["ref_weight"])[0]


def ours_free(cls, **kw):
    return lambda d: lambda h, w: cls(**kw)(h, w, d["labels"])[0]


DESIRABLE = torch.tensor([True, False, True, True, False, False])
ADV = torch.randn(B, generator=torch.Generator().manual_seed(1))


def liger_grpo(**kw):
    def make(d):
        mask = (d["labels"] != -100).float()
        ids = d["labels"].clamp(min=0)
        return lambda h, w: chunked_loss.LigerFusedLinearGRPOLoss(compiled=False, **kw)(
            h, w, ids, mask, ADV, ref_input=d["ref_hidden"], ref_weight=d["ref_weight"])[0]
    return make


def ours_grpo(**kw):
    return lambda d: lambda h, w: LinearGRPOLoss(**kw)(h, w, d["labels"], ADV, ref_hidden=d["ref_hidden"],
                                                       ref_weight=d["ref_weight"])[0]


def liger_kto(**kw):
    return lambda d: lambda h, w: chunked_loss.LigerFusedLinearKTOLoss(compiled=False, **kw)(
        h, w, d["labels"], preference_labels=DESIRABLE, kl=None)[0]


ROWS = {
    "dpo": (liger_pair(chunked_loss.LigerFusedLinearDPOLoss, beta=0.1), ours_pair(LinearDPOLoss, beta=0.1)),
    "dpo-average_log_prob": (liger_pair(chunked_loss.LigerFusedLinearDPOLoss, beta=0.1, average_log_prob=True),
                             ours_pair(LinearDPOLoss, beta=0.1, loss_type="sigmoid_norm")),
    "dpo-nll": (liger_pair(chunked_loss.LigerFusedLinearDPOLoss, beta=0.1, compute_nll_loss=True, alpha=0.5),
                ours_pair(LinearDPOLoss, beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])),
    "dpo-bco_pair": (liger_pair(chunked_loss.LigerFusedLinearDPOLoss, beta=0.3, loss_type="bco_pair"),
                     ours_pair(LinearDPOLoss, beta=0.3, loss_type="bco_pair", bco_running_mean=0.0)),
    "cpo-alpha": (liger_free(chunked_loss.LigerFusedLinearCPOLoss, alpha=0.5),
                  ours_free(LinearCPOLoss, cpo_alpha=0.5)),
    "cpo-average_log_prob": (liger_free(chunked_loss.LigerFusedLinearCPOLoss, average_log_prob=True),
                             ours_free(LinearCPOLoss, loss_type="simpo", simpo_gamma=0.0)),
    "simpo-with-nll": (liger_free(chunked_loss.LigerFusedLinearSimPOLoss),
                       ours_free(LinearCPOLoss, loss_type="simpo", beta=0.1)),
    "simpo-no-nll": (liger_free(chunked_loss.LigerFusedLinearSimPOLoss, compute_nll_loss=False, beta=2.0, gamma=0.5),
                     ours_free(LinearSimPOLoss, beta=2.0, gamma=0.5)),
    "orpo": (liger_free(chunked_loss.LigerFusedLinearORPOLoss), ours_free(LinearORPOLoss)),
    "kto-no-ref-model": (liger_kto(use_ref_model=False),
                         lambda d: lambda h, w: LinearKTOLoss()(h, w, d["labels"], DESIRABLE, kl=0.0,
                                                                ref_logps=torch.zeros(B))[0]),
    "grpo": (liger_grpo(), ours_grpo(beta=0.04, use_bias_correction_kl=False)),
    "grpo-corrected-kl": (liger_grpo(use_bias_correction_kl=True), ours_grpo(beta=0.04)),
    "cispo": (liger_grpo(loss_type="cispo", epsilon_high=3.0),
              ours_grpo(beta=0.04, loss_type="cispo", epsilon_high=3.0, use_bias_correction_kl=False)),
    "sapo": (liger_grpo(loss_type="sapo"), ours_grpo(beta=0.04, loss_type="sapo", use_bias_correction_kl=False)),
    "gspo-delta": (liger_grpo(importance_sampling_level="sequence", delta=1.5, loss_type="grpo"),
                   ours_grpo(beta=0.04, importance_sampling_level="sequence", delta=1.5, loss_type="grpo",
                             use_bias_correction_kl=False)),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_readme_mapping_gives_liger_kernels_numbers(row):
    liger, ours = ROWS[row]
    d = batch()
    want, got = run(liger(d), d), run(ours(d), d)
    for name, a, b in zip(("loss", "grad_hidden", "grad_weight"), got, want):
        assert_close(a, b, rtol=2e-5, atol=2e-6 * (1 + b.abs().max().item()), name=f"{row} {name}")


def test_cpo_alpha_is_alphapo_not_the_nll_weight():
    """The one name that means something else (TRL's): ported by name, Liger's alpha=0.5 is another loss."""
    d = batch()
    liger, _ = ROWS["cpo-alpha"]
    want = run(liger(d), d)[0]
    assert not torch.allclose(run(ours_free(LinearCPOLoss, alpha=0.5)(d), d)[0], want, rtol=1e-2)
