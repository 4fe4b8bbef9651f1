"""The row-wise work on one block of logits, in plain PyTorch.

A chunked pass computes a [rows, V] block of raw logits with one BLAS call and hands it here.
`stats`, `grad_` and `stats_grad_` are all the arithmetic that happens between the matmuls; the `cpp` and
`cuda` backends replace exactly them with one-pass native kernels (`alignfast.ops.native_rows`).

With x = softcap·tanh(z/softcap)/temperature the tempered logits of a row and p = softmax(x):
    lse = log Σ_v e^{x_v},   logprob = x_t − lse,   entropy = −Σ p log p = lse − Σ p x,
    zmean = (1/V) Σ_v x_v.
For upstream gradients g_lp, g_ent, g_lse, g_zm (per row) the gradient on x is
    ∂L/∂x_v = g_lp·[v = t] + p_v·(g_lse − g_lp − g_ent·(log p_v + H)) + g_zm/V,
then chained through the temperature (1/T) and the softcap (1 − tanh²).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from alignfast.ops.options import LogitOptions


class RowStats(NamedTuple):
    logprob: torch.Tensor
    entropy: torch.Tensor | None
    lse: torch.Tensor
    zmean: torch.Tensor | None


def tempered(z: torch.Tensor, opts: LogitOptions, *, inplace: bool) -> torch.Tensor:
    if opts.softcap is not None:
        x = z.div_(opts.softcap) if inplace else z / opts.softcap
        return x.tanh_().mul_(opts.softcap / opts.temperature)
    if opts.temperature != 1.0:
        return z.div_(opts.temperature) if inplace else z / opts.temperature
    return z


def stats(z: torch.Tensor, targets: torch.Tensor, opts: LogitOptions) -> RowStats:
    """Per-row statistics of the raw logits block `z` [n, V], which it overwrites (a row module
    whose `stats` overwrites its block must provide `stats_grad_`, as this one does)."""
    x = tempered(z, opts, inplace=True)
    m = x.amax(dim=1)
    target_logit = x.gather(1, targets[:, None]).squeeze(1)
    zmean = x.mean(dim=1) if opts.with_zmean else None
    shifted = x.sub_(m[:, None])
    if opts.with_entropy:
        e = shifted.exp()
        s = e.sum(dim=1)
        log_s = s.log()
        entropy = log_s - e.mul_(shifted).sum(dim=1) / s
    else:
        log_s = shifted.exp_().sum(dim=1).log()
        entropy = None
    lse = m + log_s
    return RowStats(target_logit - lse, entropy, lse, zmean)


def grad_(z: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor | None,
          g_logprob: torch.Tensor | None, g_entropy: torch.Tensor | None, g_lse: torch.Tensor | None,
          g_zmean: torch.Tensor | None, opts: LogitOptions) -> torch.Tensor:
    """Overwrites the raw logits block `z` [n, V] with ∂L/∂z and returns it. A None gradient is 0."""
    inv_t = 1.0 / opts.temperature
    x = tempered(z, opts, inplace=True)
    cap_slope = None
    if opts.softcap is not None:  # 1 − tanh², with tanh = x·T/softcap
        cap_slope = (x * (opts.temperature / opts.softcap)).square_().neg_().add_(1.0)

    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    g_lp = g_logprob if g_logprob is not None else zero
    coef = (g_lse if g_lse is not None else zero) - g_lp
    if g_entropy is not None:
        coef = coef - g_entropy * entropy
    coef = (coef * inv_t).expand(z.shape[0])[:, None]

    log_p = x.sub_(lse[:, None])
    if g_entropy is not None:
        p = log_p.exp()
        dz = log_p.mul_((-inv_t * g_entropy)[:, None]).add_(coef).mul_(p)
    else:
        dz = log_p.exp_().mul_(coef)
    if g_logprob is not None:
        dz.scatter_add_(1, targets[:, None], (g_logprob * inv_t)[:, None].to(dz.dtype))
    if g_zmean is not None:
        dz.add_((g_zmean * (inv_t / z.shape[1]))[:, None])
    if cap_slope is not None:
        dz.mul_(cap_slope)
    return dz


def stats_grad_(z: torch.Tensor, targets: torch.Tensor, opts: LogitOptions, upstream) -> RowStats:
    """`stats`, then `grad_` with the upstream gradients `upstream(stats)` gives, overwriting `z`
    with ∂L/∂z. With e = e^{x−m} and s = Σe: p = e/s, and ∂L/∂x = p·(c0 + ce·log p) (+ the target's
    and the mean logit's terms), c0 = (g_lse − g_lp − g_H·H)/T, ce = −g_H/T. Without entropy e is
    formed in place (no second block); with it, e is the one block beside the shifted logits, from
    which log p = (x − m) − log s is formed in place, and H = log s − Σ e·(x−m)/s."""
    inv_t = 1.0 / opts.temperature
    x = tempered(z, opts, inplace=True)
    cap_slope = None
    if opts.softcap is not None:
        cap_slope = (x * (opts.temperature / opts.softcap)).square_().neg_().add_(1.0)
    m = x.amax(dim=1)
    target_logit = x.gather(1, targets[:, None]).squeeze(1)
    zmean = x.mean(dim=1) if opts.with_zmean else None
    shifted = x.sub_(m[:, None])
    e = shifted.exp() if opts.with_entropy else shifted.exp_()
    s = e.sum(dim=1)
    log_s = s.log()
    lse = m + log_s
    entropy = None
    if opts.with_entropy:  # Σ_v e·(x−m) as a batched dot: no [n, V] temporary
        entropy = log_s - torch.bmm(e[:, None, :], shifted[:, :, None]).view(-1) / s
    st = RowStats(target_logit - lse, entropy, lse, zmean)

    g_logprob, g_entropy, g_lse, g_zmean = upstream(st)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    coef = (g_lse if g_lse is not None else zero) - (g_logprob if g_logprob is not None else zero)
    if g_entropy is not None:
        coef = coef - g_entropy * entropy
    coef = (coef * inv_t).expand(z.shape[0])
    if g_entropy is None:
        dz = e.mul_((coef / s)[:, None])
    else:
        log_p = shifted.sub_(log_s[:, None])
        dz = log_p.mul_((-inv_t * g_entropy)[:, None]).add_(coef[:, None]).mul_(e).div_(s[:, None])
    if g_logprob is not None:
        dz.scatter_add_(1, targets[:, None], (g_logprob * inv_t)[:, None].to(dz.dtype))
    if g_zmean is not None:
        dz.add_((g_zmean * (inv_t / z.shape[1]))[:, None])
    if cap_slope is not None:
        dz.mul_(cap_slope)
    return st, dz
