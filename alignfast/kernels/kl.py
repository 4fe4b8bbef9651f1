"""Fused Triton kernels of `linear_kl`: the per-token full-vocabulary KL between a policy and a
reference and its gradient (policy side), without an [N, V] buffer.

With x = (h·Wᵀ + b)/T (policy) and y = (h_ref·W_refᵀ + b_ref)/T (reference) of one token,
p = softmax(x), q = softmax(y):  KL(p‖q) = Σ p (log p − log q),  reverse: KL(q‖p) = Σ q (log q − log p).

Forward (`_kl_fwd_kernel`): grid = (cdiv(N, BLOCK_N),). A program owns BLOCK_N tokens and streams
the vocabulary in BLOCK_V tiles; each tile is two `tl.dot` chains (one over H for the policy,
one over H_ref for the reference), reduced on the spot by an online logsumexp of both and an
online, re-centred Σ e^{x−m}·((x − m) − (y − m_y)). Only [N] outputs are written.

Backward (`_kl_bwd_kernel`): one program per (token block, vocab block) tile in grouped order, as
`alignfast/kernels/logprobs.py`: it recomputes both logits tiles, forms dZ = ∂L/∂z of the policy logits and
pushes dZ·W into grad_hidden, dZᵀ·h into grad_weight and Σ_n dZ into grad_bias with fp32 atomic
adds (fp64 for fp64 inputs); see that file for why atomics. 4 vocab projections in the backward
(2 recomputed, 2 for the gradients), 2 in the forward.

Launchers (`forward`, `backward`) follow `alignfast.ops.kl.ChunkedKL` and assume validated input
(`alignfast.ops.kl.make_kl_options`): both sides in the same dtype and on the same device.

Precision, blocks and autotuning: as `alignfast/kernels/logprobs.py`, whose tile helper and block
configuration this file reuses (tiles multiplied in the input dtype, accumulated in fp32; fp64
throughout for fp64 inputs; bf16/fp16 tiles upcast to fp32 before `tl.dot` only under
TRITON_INTERPRET=1; `ALIGNFAST_AUTOTUNE=1` to autotune).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from alignfast.kernels.launch_device import on_tensor_device
from alignfast.kernels.logprobs import (
    BlockConfig,
    _acc_dtype,
    _autotune_configs,
    _flags,
    _push_grad_tile,
    _raw_logits_tile,
    _scalars,
    autotune_enabled,
    default_config,
)
from alignfast.ops.kl import KLOptions, KLStats

# A running max that starts finite: (m_old − m_new)·s_old is then 0·finite, never −inf·0.
_NEG_START = tl.constexpr(-1.0e30)


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _kl_fwd_kernel(
    hidden_ptr,      # [N, H] input dtype, strides (stride_hn, stride_hk)
    weight_ptr,      # [V, H] input dtype, strides (stride_wv, stride_wk)
    bias_ptr,        # [V] any float dtype; read only if HAS_BIAS
    ref_hidden_ptr,  # [N, H_REF] input dtype, strides (stride_rn, stride_rk)
    ref_weight_ptr,  # [V, H_REF] input dtype, strides (stride_rv, stride_rwk)
    ref_bias_ptr,    # [V] any float dtype; read only if HAS_REF_BIAS
    kl_ptr,          # [N] out, fp32 (fp64 for fp64 inputs): KL(p‖q), or KL(q‖p) if REVERSE
    lse_ptr,         # [N] out: logsumexp_v x_v
    ref_lse_ptr,     # [N] out: logsumexp_v y_v
    N, V, H, H_REF,
    stride_hn, stride_hk, stride_wv, stride_wk,
    stride_rn, stride_rk, stride_rv, stride_rwk,
    scalars_ptr,     # [1] fp32 (fp64 for fp64 inputs): 1/temperature
    N_BUCKET,        # next_power_of_2(N): only an autotune key
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, REVERSE: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, INDEX64: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    acc_dtype: tl.constexpr = lse_ptr.dtype.element_ty
    inv_temp = tl.load(scalars_ptr)
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64 if INDEX64 else tl.int32)
    row_mask = rows < N

    m = tl.full([BLOCK_N], _NEG_START, dtype=acc_dtype)    # running max of x
    s = tl.zeros([BLOCK_N], dtype=acc_dtype)               # Σ e^{x−m}
    m_r = tl.full([BLOCK_N], _NEG_START, dtype=acc_dtype)  # running max of y
    s_r = tl.zeros([BLOCK_N], dtype=acc_dtype)             # Σ e^{y−m_r}
    a = tl.zeros([BLOCK_N], dtype=acc_dtype)               # forward: Σ e^{x−m}·((x−m) − (y−m_r))
    #                                                        reverse: Σ e^{y−m_r}·((y−m_r) − (x−m))

    # For each vocab tile (columns ≥ V masked: e = 0, difference term 0), with m' = max(m, max x),
    # m_r' = max(m_r, max y), α = e^{m−m'}, α_r = e^{m_r−m_r'}:
    #   s' = α·s + Σ e^{x−m'},   s_r' = α_r·s_r + Σ e^{y−m_r'}
    #   forward: a' = α·(a + ((m−m') − (m_r−m_r'))·s) + Σ e^{x−m'}·((x−m') − (y−m_r'))
    #   reverse: a' = α_r·(a + ((m_r−m_r') − (m−m'))·s_r) + Σ e^{y−m_r'}·((y−m_r') − (x−m'))
    # (re-centring the old terms on the new maxima). Since log p = x − m − log s and
    # log q = y − m_r − log s_r:
    #   KL(p‖q) = a/s − log s + log s_r,   KL(q‖p) = a/s_r − log s_r + log s.
    for v0 in range(0, V, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64 if INDEX64 else tl.int32)
        col_mask = cols < V
        x = _raw_logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, H,
                             stride_hn, stride_hk, stride_wv, stride_wk,
                             HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        y = _raw_logits_tile(ref_hidden_ptr, ref_weight_ptr, ref_bias_ptr, rows, cols, row_mask, col_mask,
                             H_REF, stride_rn, stride_rk, stride_rv, stride_rwk,
                             HAS_REF_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        x = x * inv_temp  # finite everywhere (masked columns hold the bias or 0)
        y = y * inv_temp
        m_new = tl.maximum(m, tl.max(tl.where(col_mask[None, :], x, float("-inf")), axis=1))
        m_r_new = tl.maximum(m_r, tl.max(tl.where(col_mask[None, :], y, float("-inf")), axis=1))
        alpha = tl.exp(m - m_new)
        alpha_r = tl.exp(m_r - m_r_new)
        xs = x - m_new[:, None]
        ys = y - m_r_new[:, None]
        e = tl.exp(tl.where(col_mask[None, :], xs, float("-inf")))
        e_r = tl.exp(tl.where(col_mask[None, :], ys, float("-inf")))
        d = tl.where(col_mask[None, :], xs - ys, 0.0)  # (x − m') − (y − m_r')
        if REVERSE:
            a = alpha_r * (a + ((m_r - m_r_new) - (m - m_new)) * s_r) - tl.sum(e_r * d, axis=1)
        else:
            a = alpha * (a + ((m - m_new) - (m_r - m_r_new)) * s) + tl.sum(e * d, axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        s_r = s_r * alpha_r + tl.sum(e_r, axis=1)
        m = m_new
        m_r = m_r_new

    log_s = tl.log(s)
    log_s_r = tl.log(s_r)
    if REVERSE:
        kl = a / s_r - log_s_r + log_s
    else:
        kl = a / s - log_s + log_s_r
    tl.store(kl_ptr + rows, kl, mask=row_mask)
    tl.store(lse_ptr + rows, m + log_s, mask=row_mask)
    tl.store(ref_lse_ptr + rows, m_r + log_s_r, mask=row_mask)


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _kl_bwd_kernel(
    hidden_ptr,      # [N, H] input dtype, strides (stride_hn, stride_hk)
    weight_ptr,      # [V, H] input dtype, strides (stride_wv, stride_wk)
    bias_ptr,        # [V] any float dtype; read only if HAS_BIAS
    ref_hidden_ptr,  # [N, H_REF] input dtype, strides (stride_rn, stride_rk)
    ref_weight_ptr,  # [V, H_REF] input dtype, strides (stride_rv, stride_rwk)
    ref_bias_ptr,    # [V] any float dtype; read only if HAS_REF_BIAS
    kl_ptr,          # [N] fp32 (fp64): the KL from the forward; read only if not REVERSE
    lse_ptr,         # [N] fp32 (fp64): logsumexp_v x_v from the forward
    ref_lse_ptr,     # [N] fp32 (fp64): logsumexp_v y_v from the forward
    g_ptr,           # [N] upstream gradient of the KL
    grad_hidden_ptr,  # [N, H] fp32 (fp64), contiguous, zero-initialised; += dZ·W   if NEED_DH
    grad_weight_ptr,  # [V, H] fp32 (fp64), contiguous, zero-initialised; += dZᵀ·h  if NEED_DW
    grad_bias_ptr,    # [V] fp32 (fp64), zero-initialised; += Σ_n dZ              if NEED_DB
    N, V, H, H_REF,
    stride_hn, stride_hk, stride_wv, stride_wk,
    stride_rn, stride_rk, stride_rv, stride_rwk,
    scalars_ptr,     # [1] fp32 (fp64 for fp64 inputs): 1/temperature
    N_BUCKET,        # next_power_of_2(N): only an autotune key
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, REVERSE: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, INDEX64: tl.constexpr, GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    acc_dtype: tl.constexpr = lse_ptr.dtype.element_ty
    inv_temp = tl.load(scalars_ptr)
    # Grouped order: GROUP_N token blocks sweep the vocab together (weight tiles shared in L2).
    pid = tl.program_id(0)
    blocks_n = tl.cdiv(N, BLOCK_N)
    blocks_v = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * blocks_v
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(blocks_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64 if INDEX64 else tl.int32)
    cols = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64 if INDEX64 else tl.int32)
    row_mask = rows < N
    col_mask = cols < V
    tile_mask = row_mask[:, None] & col_mask[None, :]

    x = _raw_logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, H,
                         stride_hn, stride_hk, stride_wv, stride_wk,
                         HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H) * inv_temp
    y = _raw_logits_tile(ref_hidden_ptr, ref_weight_ptr, ref_bias_ptr, rows, cols, row_mask, col_mask, H_REF,
                         stride_rn, stride_rk, stride_rv, stride_rwk,
                         HAS_REF_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H) * inv_temp

    # With p = e^{x − lse}, q = e^{y − lse_ref} and g the upstream gradient of the row's KL:
    #   forward: ∂L/∂z_v = g/T · p_v·((log p_v − log q_v) − KL)
    #   reverse: ∂L/∂z_v = g/T · (p_v − q_v)
    # then grad_hidden[n] += Σ_v dZ[n, v]·W[v],  grad_weight[v] += Σ_n dZ[n, v]·h[n],
    #      grad_bias[v] += Σ_n dZ[n, v].
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    ref_lse = tl.load(ref_lse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0).to(acc_dtype)
    log_p = x - lse[:, None]  # finite everywhere; masked entries are zeroed below
    log_q = y - ref_lse[:, None]
    p = tl.exp(tl.where(tile_mask, log_p, float("-inf")))
    if REVERSE:
        dx = p - tl.exp(tl.where(tile_mask, log_q, float("-inf")))
    else:
        kl = tl.load(kl_ptr + rows, mask=row_mask, other=0.0)
        dx = p * tl.where(tile_mask, log_p - log_q - kl[:, None], 0.0)
    dz = tl.where(tile_mask, dx * (g * inv_temp)[:, None], 0.0)

    _push_grad_tile(dz, rows, cols, row_mask, col_mask, hidden_ptr, weight_ptr, grad_hidden_ptr, grad_weight_ptr,
                    grad_bias_ptr, stride_hn, stride_hk, stride_wv, stride_wk, H, BLOCK_H, NEED_DH, NEED_DW, NEED_DB,
                    UPCAST, DOT_PRECISION)


_KEY = ["N_BUCKET", "H", "H_REF", "V"]
_fwd_autotuned = triton.autotune(configs=_autotune_configs(), key=_KEY)(_kl_fwd_kernel)
_bwd_autotuned = triton.autotune(
    configs=_autotune_configs(), key=_KEY,
    # the kernel accumulates with atomics: every benchmarked run must start from zeros
    reset_to_zero=["grad_hidden_ptr", "grad_weight_ptr", "grad_bias_ptr"],
)(_kl_bwd_kernel)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------
def _common_args(hidden, weight, ref_hidden, ref_weight, opts: KLOptions):
    n, h = hidden.shape
    return (n, weight.shape[0], h, ref_hidden.shape[1],
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            ref_hidden.stride(0), ref_hidden.stride(1), ref_weight.stride(0), ref_weight.stride(1),
            _scalars([1.0 / opts.temperature], hidden), triton.next_power_of_2(max(n, 1)))


def _config(hidden, weight, ref_hidden, config, kernel="fwd"):
    return config or default_config(hidden.dtype, hidden.shape[0], weight.shape[0],
                                    max(hidden.shape[1], ref_hidden.shape[1]), kernel)


@on_tensor_device
def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ref_hidden: torch.Tensor,
            ref_weight: torch.Tensor, ref_bias: torch.Tensor | None, opts: KLOptions,
            config: BlockConfig | None = None) -> KLStats:
    """KLStats(kl, lse, ref_lse), each [N] in fp32 (fp64 for fp64 inputs).

    hidden [N, H], weight [V, H], ref_hidden [N, H_ref], ref_weight [V, H_ref] (any strides),
    biases [V] | None. `config` overrides the default blocks (tests force several tiles with it).
    """
    n = hidden.shape[0]
    dtype = _acc_dtype(hidden.dtype)
    stats = KLStats(*(torch.empty(n, dtype=dtype, device=hidden.device) for _ in range(3)))
    if n == 0:
        return stats
    unused = stats.lse  # a valid pointer for arguments that are never read
    args = (hidden, weight, bias.contiguous() if bias is not None else unused,
            ref_hidden, ref_weight, ref_bias.contiguous() if ref_bias is not None else unused,
            *stats, *_common_args(hidden, weight, ref_hidden, ref_weight, opts))
    flags = dict(HAS_BIAS=bias is not None, HAS_REF_BIAS=ref_bias is not None, REVERSE=opts.reverse,
                 **_flags(hidden, weight, ref_hidden, ref_weight))
    if config is None and autotune_enabled():
        _fwd_autotuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](*args, **flags)
        return stats
    cfg = _config(hidden, weight, ref_hidden, config)
    _kl_fwd_kernel[(triton.cdiv(n, cfg.block_n),)](
        *args, **flags, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return stats


@on_tensor_device
def backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ref_hidden: torch.Tensor,
             ref_weight: torch.Tensor, ref_bias: torch.Tensor | None, stats: KLStats, grad_kl: torch.Tensor,
             opts: KLOptions, needs, config: BlockConfig | None = None):
    """(grad_hidden | None, grad_weight | None, grad_bias | None) of Σ_n grad_kl[n]·KL[n], each in its
    input's dtype. `stats` come from `forward`; needs = which of (hidden, weight, bias) want one."""
    n, h = hidden.shape
    v = weight.shape[0]
    dtype = _acc_dtype(hidden.dtype)
    need_h, need_w, need_b = needs
    need_b = bool(need_b) and bias is not None
    device = hidden.device
    gh = torch.zeros(n, h, dtype=dtype, device=device) if need_h else None
    gw = torch.zeros(v, h, dtype=dtype, device=device) if need_w else None
    gb = torch.zeros(v, dtype=dtype, device=device) if need_b else None

    if n > 0 and (need_h or need_w or need_b):
        kl, lse, ref_lse = (s.contiguous() for s in stats)
        # Pointers that are never read or written; the gradients' own: autotuning zeroes them.
        unread, unwritten = lse, torch.empty(1, dtype=dtype, device=device)
        args = (hidden, weight, bias.contiguous() if bias is not None else unread,
                ref_hidden, ref_weight, ref_bias.contiguous() if ref_bias is not None else unread,
                kl, lse, ref_lse, grad_kl.contiguous(),
                *(g if g is not None else unwritten for g in (gh, gw, gb)),
                *_common_args(hidden, weight, ref_hidden, ref_weight, opts))
        flags = dict(HAS_BIAS=bias is not None, HAS_REF_BIAS=ref_bias is not None, REVERSE=opts.reverse,
                     NEED_DH=bool(need_h), NEED_DW=bool(need_w), NEED_DB=need_b,
                     **_flags(hidden, weight, ref_hidden, ref_weight))
        if config is None and autotune_enabled():
            _bwd_autotuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(v, meta["BLOCK_V"]),)](
                *args, **flags, GROUP_N=8)
        else:
            cfg = _config(hidden, weight, ref_hidden, config, "bwd")
            grid = (triton.cdiv(n, cfg.block_n) * triton.cdiv(v, cfg.block_v),)
            _kl_bwd_kernel[grid](*args, **flags, GROUP_N=cfg.group_n, BLOCK_N=cfg.block_n,
                                 BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
                                 num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    return (None if gh is None else gh.to(hidden.dtype),
            None if gw is None else gw.to(weight.dtype),
            None if gb is None else gb.to(bias.dtype))
