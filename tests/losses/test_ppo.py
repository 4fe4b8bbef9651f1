"""ppo_policy_loss / ppo_value_loss against loop-style float64 re-derivations, values and gradients."""
import pytest
import torch
from helpers import assert_close

from alignfast.losses import ppo_policy_loss, ppo_value_loss

B, T = 4, 9


def make_inputs(seed, *, seq_advantages=False, masked_row=True):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    logp = (old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    old[0, :3] = logp.detach()[0, :3]  # ties: ratio exactly 1
    adv = torch.randn((B,) if seq_advantages else (B, T), generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.75
    mask[:, 0] = True
    if masked_row:
        mask[2] = False
    return logp, old, adv, mask


def reference_policy(logp, old, adv, mask, eps_low, eps_high, dual_clip, agg):
    """Returns (loss, clipfrac, approx_kl, ratio_mean) token by token."""
    per_seq, tokens, total, n_clip, kl, ratio_sum = [], 0, 0, 0, 0.0, 0.0
    for b in range(B):
        seq, count = 0, 0
        for t in range(T):
            if not mask[b, t]:
                continue
            a = adv[b] if adv.dim() == 1 else adv[b, t]
            r = torch.exp(logp[b, t] - old[b, t])
            l1 = -a * r
            l2 = -a * min(max(r, 1 - eps_low), 1 + eps_high)
            loss = l1 if l1 >= l2 else l2
            if dual_clip is not None and a < 0:
                loss = loss if loss <= -a * dual_clip else -a * dual_clip
            seq, count = seq + loss, count + 1
            n_clip += int(l2 > l1)
            kl += float((r - 1 - torch.log(r)).detach())
            ratio_sum += float(r.detach())
        per_seq.append((seq, count))
        total, tokens = total + seq, tokens + count
    if agg == "token-mean":
        loss = total / max(tokens, 1)
    elif agg == "seq-mean-token-sum":
        loss = sum(s for s, _ in per_seq) / B
    else:
        loss = sum(s / max(c, 1) for s, c in per_seq) / B
    n = max(tokens, 1)
    return loss, n_clip / n, kl / n, ratio_sum / n


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
@pytest.mark.parametrize("clip", [(0.2, None, None), (0.2, 0.28, None), (0.1, None, 3.0), (0.2, 0.3, 1.5)],
                         ids=["eps0.2", "eps0.2-high0.28", "eps0.1-dual3", "eps0.2-high0.3-dual1.5"])
@pytest.mark.parametrize("seq_adv", [False, True], ids=["token-adv", "seq-adv"])
def test_policy_loss_matches_float64_reference(agg, clip, seq_adv):
    eps, eps_high, dual = clip
    logp, old, adv, mask = make_inputs(11 + seq_adv, seq_advantages=seq_adv)
    loss, metrics = ppo_policy_loss(logp, old, adv, mask, clip_eps=eps, clip_eps_high=eps_high, dual_clip=dual,
                                    loss_agg=agg)
    exp_loss, exp_clip, exp_kl, exp_ratio = reference_policy(logp, old, adv, mask, eps,
                                                             eps if eps_high is None else eps_high, dual, agg)
    assert_close(loss, exp_loss, rtol=1e-10, name="loss")
    assert_close(torch.autograd.grad(loss, logp)[0], torch.autograd.grad(exp_loss, logp)[0], rtol=1e-10,
                 name="d loss / d logprobs")
    assert metrics["clipfrac"].item() == pytest.approx(exp_clip, abs=1e-12)
    assert metrics["approx_kl"].item() == pytest.approx(exp_kl, rel=1e-10)
    assert metrics["ratio_mean"].item() == pytest.approx(exp_ratio, rel=1e-10)
    assert 0 < exp_clip < 1  # the case exercises both branches


def test_policy_all_masked_gives_zero_without_nan():
    logp, old, adv, _ = make_inputs(3)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for agg in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
        loss, metrics = ppo_policy_loss(logp, old, adv, mask, loss_agg=agg, dual_clip=3.0)
        (grad,) = torch.autograd.grad(loss, logp)
        assert loss.item() == 0 and (grad == 0).all()
        assert all(v.item() == 0 for v in metrics.values())


def reference_value(values, old, returns, mask, clip):
    total, tokens, n_clip = 0, 0, 0
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            e1 = (values[b, t] - returns[b, t]) ** 2
            if clip is None:
                loss = e1
            else:
                v_clipped = min(max(values[b, t], old[b, t] - clip), old[b, t] + clip)
                e2 = (v_clipped - returns[b, t]) ** 2
                loss = e1 if e1 >= e2 else e2
                n_clip += int(e2 > e1)
            total, tokens = total + loss, tokens + 1
    return 0.5 * total / max(tokens, 1), n_clip / max(tokens, 1)


@pytest.mark.parametrize("clip", [0.2, 0.05, None], ids=["clip0.2", "clip0.05", "no-clip"])
def test_value_loss_matches_float64_reference(clip):
    g = torch.Generator().manual_seed(5)
    old = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = (old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    returns = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[1] = False
    loss, metrics = ppo_value_loss(values, old, returns, mask, clip=clip)
    exp_loss, exp_clip = reference_value(values, old, returns, mask, clip)
    assert_close(loss, exp_loss, rtol=1e-10, name="loss")
    assert_close(torch.autograd.grad(loss, values)[0], torch.autograd.grad(exp_loss, values)[0], rtol=1e-10,
                 name="d loss / d values")
    assert metrics["vf_clipfrac"].item() == pytest.approx(exp_clip, abs=1e-12)
    if clip == 0.05:
        assert 0 < exp_clip < 1


def test_value_all_masked():
    v = torch.randn(2, 3, requires_grad=True)
    loss, metrics = ppo_value_loss(v, v.detach() + 1, torch.randn(2, 3), torch.zeros(2, 3))
    assert loss.item() == 0 and metrics["vf_clipfrac"].item() == 0
    assert (torch.autograd.grad(loss, v)[0] == 0).all()


def test_validation():
    logp, old, adv, mask = make_inputs(0)
    with pytest.raises(ValueError, match=r"old_logprobs \(4, 8\).*logprobs \(4, 9\)"):
        ppo_policy_loss(logp, old[:, :8], adv, mask)
    with pytest.raises(ValueError, match=r"advantages must be \[B, T\]"):
        ppo_policy_loss(logp, old, adv[:3], mask)
    with pytest.raises(ValueError, match=r"mask \(4, 8\)"):
        ppo_policy_loss(logp, old, adv, mask[:, :8])
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        ppo_policy_loss(logp, old, adv, mask, dual_clip=0.9)
    with pytest.raises(ValueError, match="loss_agg='mean'.*token-mean"):
        ppo_policy_loss(logp, old, adv, mask, loss_agg="mean")
    with pytest.raises(ValueError, match="clip_eps"):
        ppo_policy_loss(logp, old, adv, mask, clip_eps=-0.1)
    with pytest.raises(ValueError, match=r"returns \(4, 8\)"):
        ppo_value_loss(old, old, old[:, :8], mask)
