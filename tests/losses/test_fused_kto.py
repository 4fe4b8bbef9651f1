"""LinearKTOLoss against kto_loss on materialised float64 log-probs."""
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from alignfast.losses.fused_kto import LinearKTOLoss
from alignfast.losses.kto import kto_kl_estimate, kto_loss

B, T, H, V = 5, 6, 10, 41
FP64, FP32 = torch.float64, torch.float32


def token_logps(hidden, weight, bias, labels):
    logits = hidden.double() @ weight.double().t() + bias.double()
    valid = labels != -100
    return F.log_softmax(logits, -1).gather(-1, labels.where(valid, 0)[..., None]).squeeze(-1) * valid


def make_batch(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.arange(T) < torch.tensor([2, 1, 3, 2, 4])[:, None]] = -100
    kl_labels = labels.roll(1, 0)  # mismatched completions
    return dict(
        policy=dict(hidden=rnd(B, T, H), weight=rnd(V, H, scale=H**-0.5), bias=rnd(V)),
        ref=dict(ref_hidden=rnd(B, T, H), ref_weight=rnd(V, H, scale=H**-0.5), ref_bias=rnd(V)),
        labels=labels, desirable=torch.tensor([True, False, True, True, False]),
        kl_hidden=rnd(B, T, H), ref_kl_hidden=rnd(B, T, H), kl_labels=kl_labels)


@pytest.mark.parametrize("kl_mode", ["given", "estimated", "apo"])
@pytest.mark.parametrize("dtype,chunk_size,ref_mode", [(FP64, 7, "hidden"), (FP64, 9, "seq"), (FP32, 12, "hidden"),
                                                       (FP64, 2, "token")],
                         ids=["fp64-c7-hidden", "fp64-c9-seq", "fp32-c12-hidden", "fp64-c2-token-split"])
def test_kto(dtype, chunk_size, ref_mode, kl_mode):
    d = make_batch(dtype)
    labels, desirable = d["labels"], d["desirable"]
    leaves = {k: v.requires_grad_() for k, v in d["policy"].items()}
    ref = d["ref"]
    ref_tok = token_logps(*ref.values(), labels)
    refs = ref if ref_mode == "hidden" else dict(ref_logps=(ref_tok if ref_mode == "token" else ref_tok.sum(-1)).to(dtype))
    kw = dict(beta=0.2, desirable_weight=1.3, undesirable_weight=0.7,
              loss_type="apo_zero_unpaired" if kl_mode == "apo" else "kto")
    policy_kl = token_logps(d["kl_hidden"], *list(d["policy"].values())[1:], d["kl_labels"]).sum(-1)
    ref_kl = token_logps(d["ref_kl_hidden"], ref["ref_weight"], ref["ref_bias"], d["kl_labels"]).sum(-1)
    z0 = kto_kl_estimate(policy_kl, ref_kl) + 0.05 if kl_mode != "apo" else None
    extra = dict(kl=z0.to(dtype)) if kl_mode == "given" else {}
    if kl_mode == "estimated":
        z0 = kto_kl_estimate(policy_kl, ref_kl)
        extra = dict(kl_hidden=d["kl_hidden"], kl_labels=d["kl_labels"], ref_kl_hidden=d["ref_kl_hidden"])
        if ref_mode != "hidden":  # no reference model: the reference's KL log-probs precomputed too
            extra = dict(kl_hidden=d["kl_hidden"], kl_labels=d["kl_labels"], ref_kl_logps=ref_kl.to(dtype))
    loss, metrics = LinearKTOLoss(backend="chunked", chunk_size=chunk_size, **kw)(
        leaves["hidden"], leaves["weight"], labels, desirable, leaves["bias"], **refs, **extra)

    oracle = {k: v.detach().double().requires_grad_() for k, v in d["policy"].items()}
    lp = token_logps(*oracle.values(), labels).sum(-1)
    losses, cr, rr = kto_loss(lp, ref_tok.sum(-1), desirable, z0, **kw)
    want = losses.mean()
    rtol = 1e-10 if dtype == FP64 else 1e-5
    assert_close(loss, want, rtol=rtol, name="loss")
    for got, exp, name in zip(torch.autograd.grad(loss, list(leaves.values())),
                              torch.autograd.grad(want, list(oracle.values())), leaves):
        assert_close(got, exp, rtol=rtol, name=name)
    want_metrics = {"rewards/chosen": cr.mean(), "rewards/rejected": rr.mean(), "rewards/margins": cr.mean() - rr.mean(),
                    "logps/chosen": lp[desirable].mean(), "logps/rejected": lp[~desirable].mean()}
    if z0 is not None:
        want_metrics["kl"] = z0
    for name, value in want_metrics.items():
        assert_close(metrics[name], value, rtol=rtol, atol=rtol, name=name)


def test_kto_one_sided_batch():
    d = make_batch(FP64)
    leaves = {k: v.requires_grad_() for k, v in d["policy"].items()}
    loss, metrics = LinearKTOLoss(backend="chunked", chunk_size=7)(
        leaves["hidden"], leaves["weight"], d["labels"], torch.ones(B, dtype=torch.bool), leaves["bias"],
        **d["ref"], kl=0.0)
    loss.backward()
    assert torch.isfinite(loss) and "rewards/rejected" not in metrics and "rewards/margins" not in metrics


def test_kto_bad_input():
    d = make_batch(FP64)
    p = d["policy"]
    with pytest.raises(ValueError, match="reference point"):
        LinearKTOLoss()(p["hidden"], p["weight"], d["labels"], d["desirable"], **d["ref"])
    with pytest.raises(ValueError, match="desirable"):
        LinearKTOLoss()(p["hidden"], p["weight"], d["labels"], d["desirable"][:3], **d["ref"], kl=0.0)
    with pytest.raises(ValueError, match="loss_type"):
        LinearKTOLoss(loss_type="sigmoid")
