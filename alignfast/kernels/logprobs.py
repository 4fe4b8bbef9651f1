"""Fused Triton kernels of `linear_logprobs`: per-token statistics of the tempered logits
x = softcap·tanh((h·Wᵀ + b)/softcap)/T and their gradient, without an [N, V] buffer.

Forward (`_logprobs_fwd_kernel`): grid = (cdiv(N, BLOCK_N),). A program owns BLOCK_N tokens
and streams the whole vocabulary in BLOCK_V tiles; each logits tile is one [BLOCK_N, BLOCK_H] ×
[BLOCK_H, BLOCK_V] `tl.dot` chain over H, reduced on the spot by an online (max, sum)
logsumexp. Only [N] outputs are written.

Backward (`_logprobs_bwd_kernel`): grid = (cdiv(N, BLOCK_N) · cdiv(V, BLOCK_V),), one program per
(token block, vocab block) tile, in grouped order so that neighbouring programs share weight
tiles in L2. A program recomputes its logits tile, turns it into dZ = ∂L/∂z, and pushes
dZ·W into grad_hidden and dZᵀ·h into grad_weight with fp32 atomic adds (fp64 for fp64 inputs).
Why atomics: grad_hidden needs a sum over V and grad_weight a sum over N. A deterministic
scheme needs either the [N, V] dZ in memory (what this op exists to avoid), or a program that
owns a whole [BLOCK_N, H] (or [BLOCK_V, H]) accumulator, which does not fit in registers for
H in the thousands and so means recomputing the logits H/BLOCK_H times. Atomics cost one
recompute and 3 projections in all; the price is fp32 summation order, i.e. results that
vary run to run at the ~1e-7 relative level (the same trade cut-cross-entropy makes).

Launchers (`forward`, `backward`) follow the interface of `alignfast.ops.chunked.ChunkedLogProbs`
and assume validated input (`alignfast.ops.validation`): all targets in [0, V).

Precision: tiles are multiplied in the input dtype (bf16/fp16 on tensor cores, fp32 with
`input_precision="ieee"`, i.e. no TF32), accumulated in fp32; fp64 inputs compute everything in
fp64. Under TRITON_INTERPRET=1 bf16/fp16 tiles are upcast to fp32 before `tl.dot`, because the
interpreter's low-precision dot is wrong (a known upstream issue) — only there.

Blocks: a default per dtype and kernel (`default_config`); `ALIGNFAST_AUTOTUNE=1` autotunes a
few configs instead, keyed on (power-of-two bucket of N, H, V).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from alignfast.dispatch import triton_interpreted
from alignfast.kernels.launch_device import on_tensor_device
from alignfast.ops.options import LogitOptions
from alignfast.ops.rowwise import RowStats

# A running max that starts finite: (m_old − m_new)·s_old is then 0·finite, never −inf·0.
_NEG_START = tl.constexpr(-1.0e30)


@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes and launch parameters of both kernels."""

    block_n: int = 64
    block_v: int = 128
    block_h: int = 64
    num_warps: int = 8
    num_stages: int = 3
    group_n: int = 8  # backward: token blocks per group of the grouped program order


def default_config(dtype: torch.dtype, n: int, v: int, h: int, kernel: str = "fwd") -> BlockConfig:
    """The default blocks of `kernel` ("fwd" or "bwd") for inputs of `dtype`.

    GPU (chosen for H100/H200, sm_90): bf16/fp16 64×128×64 tiles (the backward with BLOCK_H=32),
    fp32 64×64×32, fp64 32×64×32. Compiled ahead of time for sm_90 (Triton 3.9, ptxas): the log-prob
    kernels fill ~250 registers without spilling (fp64's backward spills 220 B); the KL kernels spill a
    little (bf16 forward 248 B, fp32 24 B), one block per SM. Under the interpreter: big tiles, since each
    program costs Python overhead (masks keep any size right).
    """
    if triton_interpreted():
        return BlockConfig(block_n=min(max(triton.next_power_of_2(n), 16), 128),
                           block_v=min(max(triton.next_power_of_2(v), 16), 1024),
                           block_h=min(max(triton.next_power_of_2(h), 16), 128),
                           num_warps=1, num_stages=1)
    if dtype == torch.float64:  # fp64 registers are twice as wide
        return BlockConfig(block_n=32, block_v=64, block_h=32, num_warps=4, num_stages=2)
    if dtype == torch.float32:  # ieee fp32 dot runs on FMA units, with wide register layouts
        return BlockConfig(block_n=64, block_v=64, block_h=32, num_warps=8, num_stages=2)
    return BlockConfig(block_h=64 if kernel == "fwd" else 32)


def autotune_enabled() -> bool:
    return os.environ.get("ALIGNFAST_AUTOTUNE", "0") == "1" and not triton_interpreted()


def _autotune_configs():
    shapes = [(64, 128, 64, 8, 3), (64, 128, 32, 8, 3), (128, 128, 32, 8, 3), (64, 256, 32, 8, 3),
              (128, 64, 64, 4, 4), (64, 64, 32, 8, 2), (32, 128, 64, 4, 3)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_H": bh}, num_warps=w, num_stages=s)
            for bn, bv, bh, w, s in shapes]


# ---------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------
@triton.jit
def _tanh(x):
    """tanh from exp, accurate to a few ulp of fp32 (and of fp64): a Taylor polynomial near 0,
    where (1 − e^{−2|x|}) would cancel, and sign(x)·(1 − e^{−2|x|})/(1 + e^{−2|x|}) elsewhere.
    (libdevice's tanh does not exist in Triton's interpreter.)"""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    far = (1.0 - e) / (1.0 + e)
    x2 = x * x
    # x − x³/3 + 2x⁵/15 − 17x⁷/315 + 62x⁹/2835; the next term is < 1e-15 relative for |x| < 0.05
    near = a * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    t = tl.where(a < 0.05, near, far)
    return tl.where(x < 0, -t, t)


@triton.jit
def _raw_logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, H,
                     stride_hn, stride_hk, stride_wv, stride_wk,
                     HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """z[i, j] = Σ_k hidden[rows_i, k]·weight[cols_j, k] (+ bias[cols_j]), accumulated in the
    dtype of the dot (fp32, or fp64 for fp64 inputs). Masked rows/columns hold 0 (+ bias)."""
    acc_dtype: tl.constexpr = tl.float64 if hidden_ptr.dtype.element_ty == tl.float64 else tl.float32
    z = tl.zeros([BLOCK_N, BLOCK_V], dtype=acc_dtype)
    for k0 in range(0, H, BLOCK_H):
        ks = (k0 + tl.arange(0, BLOCK_H)).to(rows.dtype)  # int64 with INDEX64: ks·stride can pass 2³¹ too
        k_mask = ks < H
        h = tl.load(hidden_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(weight_ptr + cols[:, None] * stride_wv + ks[None, :] * stride_wk,
                    mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        # out_dtype named: Triton before 3.7 took fp32 whatever the accumulator (fp64 inputs failed to compile)
        z = tl.dot(h, tl.trans(w), z, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(acc_dtype)[None, :]
    return z


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _logprobs_fwd_kernel(
    hidden_ptr,    # [N, H] input dtype, strides (stride_hn, stride_hk)
    weight_ptr,    # [V, H] input dtype, strides (stride_wv, stride_wk)
    bias_ptr,      # [V] any float dtype; read only if HAS_BIAS
    targets_ptr,   # [N] int, every value in [0, V)
    logprob_ptr,   # [N] out, fp32 (fp64 for fp64 inputs): x_t − lse
    lse_ptr,       # [N] out: logsumexp_v x_v
    entropy_ptr,   # [N] out, written only if WITH_ENTROPY: −Σ p log p
    zmean_ptr,     # [N] out, written only if WITH_ZMEAN: (1/V) Σ_v x_v
    N, V, H,
    stride_hn, stride_hk, stride_wv, stride_wk,
    scalars_ptr,   # [3] fp32 (fp64): softcap (read if SOFTCAP), 1/temperature, grad_filter_eps (`_scalars`)
    N_BUCKET,      # next_power_of_2(N): only an autotune key
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr, WITH_ZMEAN: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, INDEX64: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    acc_dtype: tl.constexpr = lse_ptr.dtype.element_ty
    softcap, inv_temp = tl.load(scalars_ptr), tl.load(scalars_ptr + 1)
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64 if INDEX64 else tl.int32)
    row_mask = rows < N
    target = tl.load(targets_ptr + rows, mask=row_mask, other=-1).to(tl.int32)

    m = tl.full([BLOCK_N], _NEG_START, dtype=acc_dtype)  # running max of x
    s = tl.zeros([BLOCK_N], dtype=acc_dtype)             # Σ e^{x−m}
    a = tl.zeros([BLOCK_N], dtype=acc_dtype)             # Σ e^{x−m}·(x−m)        (entropy)
    x_sum = tl.zeros([BLOCK_N], dtype=acc_dtype)         # Σ x                    (zmean)
    x_t = tl.zeros([BLOCK_N], dtype=acc_dtype)           # x at the target

    # For each vocab tile with logits x (columns ≥ V masked to −inf), m' = max(m, max_v x):
    #   s' = e^{m−m'}·s + Σ_v e^{x−m'}
    #   a' = e^{m−m'}·(a + (m−m')·s) + Σ_v e^{x−m'}·(x−m')      [Σ e^{x−m'}(x−m') re-centred]
    # Finally lse = m + log s, logprob = x_t − lse, entropy = log s − a/s, zmean = Σ x / V.
    for v0 in range(0, V, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64 if INDEX64 else tl.int32)
        col_mask = cols < V
        x = _raw_logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, H,
                             stride_hn, stride_hk, stride_wv, stride_wk,
                             HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        if SOFTCAP:
            x = softcap * _tanh(x / softcap)
        x = x * inv_temp
        x_t += tl.sum(tl.where(cols[None, :] == target[:, None], x, 0.0), axis=1)
        if WITH_ZMEAN:
            x_sum += tl.sum(tl.where(col_mask[None, :], x, 0.0), axis=1)
        x = tl.where(col_mask[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        alpha = tl.exp(m - m_new)
        shifted = x - m_new[:, None]
        e = tl.exp(shifted)
        if WITH_ENTROPY:
            a = alpha * (a + (m - m_new) * s) + tl.sum(e * tl.where(col_mask[None, :], shifted, 0.0), axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        m = m_new

    log_s = tl.log(s)
    lse = m + log_s
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(logprob_ptr + rows, x_t - lse, mask=row_mask)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + rows, log_s - a / s, mask=row_mask)
    if WITH_ZMEAN:
        tl.store(zmean_ptr + rows, x_sum / V, mask=row_mask)


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _push_grad_tile(dz, rows, cols, row_mask, col_mask, hidden_ptr, weight_ptr, grad_hidden_ptr, grad_weight_ptr,
                    grad_bias_ptr, stride_hn, stride_hk, stride_wv, stride_wk, H,
                    BLOCK_H: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Adds a [BLOCK_N, BLOCK_V] tile of dL/dz (zero outside the masks) to the gradients:
    grad_hidden[n] += Σ_v dZ[n, v]·W[v],  grad_weight[v] += Σ_n dZ[n, v]·h[n],  grad_bias[v] += Σ_n dZ[n, v]."""
    acc_dtype: tl.constexpr = dz.dtype
    if NEED_DB:
        tl.atomic_add(grad_bias_ptr + cols, tl.sum(dz, axis=0), mask=col_mask, sem="relaxed")
    if NEED_DH or NEED_DW:
        # Tensor-core operand: dZ in the input dtype (what PyTorch's own backward feeds its
        # matmuls); accumulation stays fp32.
        if UPCAST:
            dz_op = dz.to(tl.float32)
        else:
            dz_op = dz.to(hidden_ptr.dtype.element_ty)
        for k0 in range(0, H, BLOCK_H):
            ks = (k0 + tl.arange(0, BLOCK_H)).to(rows.dtype)
            k_mask = ks < H
            if NEED_DH:
                w = tl.load(weight_ptr + cols[:, None] * stride_wv + ks[None, :] * stride_wk,
                            mask=col_mask[:, None] & k_mask[None, :], other=0.0)
                if UPCAST:
                    w = w.to(tl.float32)
                dh = tl.dot(dz_op, w, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
                tl.atomic_add(grad_hidden_ptr + rows[:, None] * H + ks[None, :], dh,
                              mask=row_mask[:, None] & k_mask[None, :], sem="relaxed")
            if NEED_DW:
                h = tl.load(hidden_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hk,
                            mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                if UPCAST:
                    h = h.to(tl.float32)
                dw = tl.dot(tl.trans(dz_op), h, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
                tl.atomic_add(grad_weight_ptr + cols[:, None] * H + ks[None, :], dw,
                              mask=col_mask[:, None] & k_mask[None, :], sem="relaxed")


@triton.jit
def _logprobs_bwd_kernel(
    hidden_ptr,    # [N, H] input dtype, strides (stride_hn, stride_hk)
    weight_ptr,    # [V, H] input dtype, strides (stride_wv, stride_wk)
    bias_ptr,      # [V] any float dtype; read only if HAS_BIAS
    targets_ptr,   # [N] int, every value in [0, V)
    lse_ptr,       # [N] fp32 (fp64): logsumexp of the tempered logits, from the forward
    entropy_ptr,   # [N] entropy from the forward; read only if G_ENTROPY
    g_lp_ptr,      # [N] upstream gradient of logprob (zeros when there is none)
    g_lse_ptr,     # [N] upstream gradient of lse (zeros when there is none)
    g_ent_ptr,     # [N] upstream gradient of entropy; read only if G_ENTROPY
    g_zm_ptr,      # [N] upstream gradient of zmean; read only if G_ZMEAN
    grad_hidden_ptr,  # [N, H] fp32 (fp64), contiguous, zero-initialised; += dZ·W   if NEED_DH
    grad_weight_ptr,  # [V, H] fp32 (fp64), contiguous, zero-initialised; += dZᵀ·h  if NEED_DW
    grad_bias_ptr,    # [V] fp32 (fp64), zero-initialised; += Σ_n dZ              if NEED_DB
    N, V, H,
    stride_hn, stride_hk, stride_wv, stride_wk,
    scalars_ptr,   # [3] fp32 (fp64): softcap (read if SOFTCAP), 1/temperature, grad_filter_eps (if FILTER)
    N_BUCKET,      # next_power_of_2(N): only an autotune key
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, G_ENTROPY: tl.constexpr, G_ZMEAN: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, FILTER: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, INDEX64: tl.constexpr, GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    acc_dtype: tl.constexpr = lse_ptr.dtype.element_ty
    softcap, inv_temp = tl.load(scalars_ptr), tl.load(scalars_ptr + 1)
    # Grouped order: GROUP_N token blocks sweep the vocab together, so a weight tile is read
    # from DRAM once per group rather than once per token block.
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

    z = _raw_logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, H,
                         stride_hn, stride_hk, stride_wv, stride_wk,
                         HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    if SOFTCAP:
        t = _tanh(z / softcap)
        x = softcap * t * inv_temp
    else:
        x = z * inv_temp

    # With p = e^{x − lse} and H the entropy of the row:
    #   ∂L/∂x_v = g_lp·[v = t] + p_v·(g_lse − g_lp − g_ent·(log p_v + H)) + g_zm/V
    #   ∂L/∂z_v = ∂L/∂x_v / T · (1 − tanh²(z_v/softcap))   (the last factor only with a softcap)
    # then grad_hidden[n] += Σ_v dZ[n, v]·W[v],  grad_weight[v] += Σ_n dZ[n, v]·h[n],
    #      grad_bias[v] += Σ_n dZ[n, v].
    target = tl.load(targets_ptr + rows, mask=row_mask, other=-1).to(tl.int32)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g_lp = tl.load(g_lp_ptr + rows, mask=row_mask, other=0.0).to(acc_dtype)
    g_lse = tl.load(g_lse_ptr + rows, mask=row_mask, other=0.0).to(acc_dtype)
    log_p = x - lse[:, None]
    p = tl.exp(tl.where(tile_mask, log_p, float("-inf")))
    coef = (g_lse - g_lp)[:, None]
    if G_ENTROPY:
        g_ent = tl.load(g_ent_ptr + rows, mask=row_mask, other=0.0).to(acc_dtype)
        ent = tl.load(entropy_ptr + rows, mask=row_mask, other=0.0).to(acc_dtype)
        coef = coef - g_ent[:, None] * (tl.where(tile_mask, log_p, 0.0) + ent[:, None])
    dx = p * coef + tl.where(cols[None, :] == target[:, None], g_lp[:, None], 0.0)
    if G_ZMEAN:
        g_zm = tl.load(g_zm_ptr + rows, mask=row_mask, other=0.0).to(acc_dtype)
        dx += g_zm[:, None] / V
    dz = dx * inv_temp
    if SOFTCAP:
        dz = dz * (1.0 - t * t)
    dz = tl.where(tile_mask, dz, 0.0)

    if FILTER:  # grad_filter_eps: a tile whose every |dL/dz| is below eps skips its products
        push = tl.max(tl.max(tl.abs(dz), axis=1), axis=0) >= tl.load(scalars_ptr + 2)
    else:
        push = True
    if push:
        _push_grad_tile(dz, rows, cols, row_mask, col_mask, hidden_ptr, weight_ptr, grad_hidden_ptr,
                        grad_weight_ptr, grad_bias_ptr, stride_hn, stride_hk, stride_wv, stride_wk, H, BLOCK_H,
                        NEED_DH, NEED_DW, NEED_DB, UPCAST, DOT_PRECISION)


_fwd_autotuned = triton.autotune(configs=_autotune_configs(), key=["N_BUCKET", "H", "V"])(
    _logprobs_fwd_kernel)
_bwd_autotuned = triton.autotune(
    configs=_autotune_configs(), key=["N_BUCKET", "H", "V"],
    # the kernel accumulates with atomics: every benchmarked run must start from zeros
    reset_to_zero=["grad_hidden_ptr", "grad_weight_ptr", "grad_bias_ptr"],
)(_logprobs_bwd_kernel)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _flags(hidden: torch.Tensor, *operands: torch.Tensor) -> dict:
    """The launch flags that follow from the inputs: `hidden` and every other [rows, H] operand."""
    upcast = triton_interpreted() and hidden.dtype in (torch.bfloat16, torch.float16)
    # fp32 inputs: true fp32 products (no TF32), to match PyTorch's default fp32 matmul.
    return dict(UPCAST=upcast, DOT_PRECISION="ieee", INDEX64=_needs_int64_offsets(hidden, *operands))


def _needs_int64_offsets(*operands: torch.Tensor) -> bool:
    """Whether an element offset the kernels compute, row·stride + column·stride into an operand or
    into a contiguous gradient of its shape, can reach 2³¹. Then rows and columns are int64: int32
    products would wrap and read (or write) far outside the tensor. Rare (N·H ≥ 2³¹, e.g. 512k
    tokens at H = 4096) and slower, hence a compile-time flag rather than always."""
    far = max((max(t.numel(), 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())))
               for t in operands), default=0)
    return far > 2**31


def _scalars(values, hidden: torch.Tensor) -> torch.Tensor:
    """The kernels' float options as a tensor in the accumulation dtype: a Python float argument
    reaches a compiled kernel as fp32, which would round them for fp64 inputs."""
    return torch.tensor(values, dtype=_acc_dtype(hidden.dtype), device=hidden.device)


def _common_args(hidden, weight, opts: LogitOptions):
    n, h = hidden.shape
    v = weight.shape[0]
    scalars = _scalars([1.0 if opts.softcap is None else opts.softcap, 1.0 / opts.temperature,
                        opts.grad_filter_eps or 0.0], hidden)
    return (n, v, h, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), scalars,
            triton.next_power_of_2(max(n, 1)))


@on_tensor_device
def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
            opts: LogitOptions, config: BlockConfig | None = None) -> RowStats:
    """RowStats(logprob, entropy | None, lse, zmean | None), each [N] in fp32 (fp64 for fp64 inputs).

    hidden [N, H] and weight [V, H] (any strides), bias [V] | None, targets [N] in [0, V).
    `config` overrides the default blocks (tests use it to force several tiles per dimension).
    """
    n, v = hidden.shape[0], weight.shape[0]
    dtype = _acc_dtype(hidden.dtype)
    out = [torch.empty(n, dtype=dtype, device=hidden.device) for _ in range(4)]
    logprob, entropy, lse, zmean = out
    stats = RowStats(logprob, entropy if opts.with_entropy else None, lse, zmean if opts.with_zmean else None)
    if n == 0:
        return stats
    targets = targets.contiguous()
    bias_arg = bias.contiguous() if bias is not None else lse  # a valid pointer that is never read
    args = (hidden, weight, bias_arg, targets, logprob, lse, entropy, zmean,
            *_common_args(hidden, weight, opts))
    flags = dict(HAS_BIAS=bias is not None, SOFTCAP=opts.softcap is not None, WITH_ENTROPY=opts.with_entropy,
                 WITH_ZMEAN=opts.with_zmean, **_flags(hidden, weight))
    if config is None and autotune_enabled():
        _fwd_autotuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](*args, **flags)
        return stats
    cfg = config or default_config(hidden.dtype, n, v, hidden.shape[1])
    _logprobs_fwd_kernel[(triton.cdiv(n, cfg.block_n),)](
        *args, **flags, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return stats


@on_tensor_device
def backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
             lse: torch.Tensor, entropy: torch.Tensor | None, grads, opts: LogitOptions, needs,
             config: BlockConfig | None = None):
    """(grad_hidden | None, grad_weight | None, grad_bias | None), each in its input's dtype.

    grads = (g_logprob, g_entropy, g_lse, g_zmean), each [N] or None (= 0); needs = which of
    (hidden, weight, bias) want a gradient. lse (and entropy, when g_entropy is given) come from
    `forward`.
    """
    n, h = hidden.shape
    v = weight.shape[0]
    dtype = _acc_dtype(hidden.dtype)
    need_h, need_w, need_b = needs
    need_b = bool(need_b) and bias is not None
    g_lp, g_ent, g_lse, g_zm = grads
    if g_ent is not None and entropy is None:
        raise ValueError("an entropy gradient needs the entropy saved by the forward (opts.with_entropy)")
    device = hidden.device
    gh = torch.zeros(n, h, dtype=dtype, device=device) if need_h else None
    gw = torch.zeros(v, h, dtype=dtype, device=device) if need_w else None
    gb = torch.zeros(v, dtype=dtype, device=device) if need_b else None

    if n > 0 and (need_h or need_w or need_b):
        zeros = None

        def row_vector(g):
            nonlocal zeros
            if g is None:
                if zeros is None:
                    zeros = torch.zeros(n, dtype=dtype, device=device)
                return zeros
            return g.contiguous()

        lse_c = lse.contiguous()
        # Pointers that are never read or written; the gradients' own: autotuning zeroes them.
        unread, unwritten = lse_c, torch.empty(1, dtype=dtype, device=device)
        args = (hidden, weight, bias.contiguous() if bias is not None else unread, targets.contiguous(), lse_c,
                entropy.contiguous() if g_ent is not None else unread,
                row_vector(g_lp), row_vector(g_lse),
                g_ent.contiguous() if g_ent is not None else unread,
                g_zm.contiguous() if g_zm is not None else unread,
                *(g if g is not None else unwritten for g in (gh, gw, gb)),
                *_common_args(hidden, weight, opts))
        flags = dict(HAS_BIAS=bias is not None, SOFTCAP=opts.softcap is not None, G_ENTROPY=g_ent is not None,
                     G_ZMEAN=g_zm is not None, NEED_DH=bool(need_h), NEED_DW=bool(need_w), NEED_DB=need_b,
                     FILTER=opts.grad_filter_eps is not None, **_flags(hidden, weight))
        if config is None and autotune_enabled():
            _bwd_autotuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(v, meta["BLOCK_V"]),)](
                *args, **flags, GROUP_N=8)
        else:
            cfg = config or default_config(hidden.dtype, n, v, h, "bwd")
            grid = (triton.cdiv(n, cfg.block_n) * triton.cdiv(v, cfg.block_v),)
            _logprobs_bwd_kernel[grid](*args, **flags, GROUP_N=cfg.group_n, BLOCK_N=cfg.block_n,
                                       BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
                                       num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    return (None if gh is None else gh.to(hidden.dtype),
            None if gw is None else gw.to(weight.dtype),
            None if gb is None else gb.to(bias.dtype))


@on_tensor_device
def forward_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     targets: torch.Tensor, opts: LogitOptions, upstream, needs, *, bounds=None,
                     config: BlockConfig | None = None):
    """(RowStats, (grad_hidden, grad_weight, grad_bias)) when the upstream gradient follows from
    the statistics themselves (reduced losses), as `ChunkedLogProbs.forward_backward`.

    `upstream(stats of rows [start, stop))` -> (g_logprob, g_entropy, g_lse, g_zmean) is called once
    per range of `bounds` (default: one range, all rows), in order. Here that is the forward kernel,
    `upstream` on its [N] outputs, then the backward kernel: 4 vocab projections, no logits buffer.
    """
    stats = forward(hidden, weight, bias, targets, opts, config)
    n = hidden.shape[0]
    ranges = list(bounds) if bounds is not None else ([(0, n)] if n else [])
    pieces = [upstream(RowStats(*(None if s is None else s[start:stop] for s in stats)))
              for start, stop in ranges]
    dtype = stats.lse.dtype
    grads = []
    for i in range(4):
        if all(p[i] is None for p in pieces):
            grads.append(None)
            continue
        g = torch.zeros(n, dtype=dtype, device=hidden.device)
        for (start, stop), p in zip(ranges, pieces):
            if p[i] is not None:
                g[start:stop] = torch.as_tensor(p[i], dtype=dtype, device=hidden.device)
        grads.append(g)
    return stats, backward(hidden, weight, bias, targets, stats.lse, stats.entropy, grads, opts, needs,
                           config)
