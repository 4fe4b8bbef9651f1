"""The row-wise work on one block of logits, in `alignfast._C`'s native kernels.

Same interface and the same math as `alignfast.ops.rowwise` (read its docstring), for the `cpp`
(CPU) and `cuda` backends: `stats` reads each row of the raw logits block once (online max/sum,
target gather, Σ p·x for the entropy, Σ x for the mean logit); `grad_` overwrites the block with
∂L/∂z in one read-modify-write pass. The operators are `torch.ops.alignfast.logprob_rows_stats`
and `torch.ops.alignfast.logprob_rows_grad_` (registered by csrc/alignfast.cpp and
csrc/cuda/bindings.cpp); the fake (meta) implementations below let `torch.compile(fullgraph=True)`
trace through them, the in-place `grad_` being functionalised by torch.

    z       [n, V]  raw logits block, fp32 or fp64, contiguous along V
    targets [n]     target ids in [0, V) (ignored positions already removed)
    lse, entropy, g_* [n] in z's dtype (a 0-d upstream gradient is broadcast to the rows)

`kl_stats` / `kl_grad_` are the same for `linear_kl` on a pair of blocks, the policy's z and the
reference's z_ref [n, V] (`torch.ops.alignfast.kl_rows_stats` / `kl_rows_grad_`, csrc/kl_rows.h):
one read of both for (kl, lse, ref_lse), one read-modify-write of z for ∂(Σ g·kl)/∂z.
"""
from __future__ import annotations

import torch

from alignfast import _native
from alignfast.ops.options import LogitOptions
from alignfast.ops.rowwise import RowStats

STATS_OP = "alignfast::logprob_rows_stats"
GRAD_OP = "alignfast::logprob_rows_grad_"
KL_STATS_OP = "alignfast::kl_rows_stats"
KL_GRAD_OP = "alignfast::kl_rows_grad_"


def available() -> bool:
    """Whether `alignfast._C` is loaded and defines the row operators."""
    return _native.extension() is not None and hasattr(torch.ops.alignfast, "logprob_rows_stats")


def kl_available() -> bool:
    """Whether `alignfast._C` defines the KL row operators too (an extension built before them does not)."""
    return available() and hasattr(torch.ops.alignfast, "kl_rows_stats")


def kl_grad_into_ref_available() -> bool:
    """The KL gradient op takes `into_ref` (an `alignfast._C` built before it would not)."""
    return kl_available() and "into_ref" in str(torch.ops.alignfast.kl_rows_grad_.default._schema)


def _register_fakes() -> None:
    @torch.library.register_fake(STATS_OP)
    def _stats_fake(z, targets, temperature, softcap, with_entropy, with_zmean):
        n = z.shape[0]
        return (z.new_empty(n), z.new_empty(n if with_entropy else 0), z.new_empty(n),
                z.new_empty(n if with_zmean else 0))

    @torch.library.register_fake(GRAD_OP)
    def _grad_fake(z, targets, lse, entropy, g_logprob, g_entropy, g_lse, g_zmean, temperature, softcap):
        return None

    if kl_available():
        @torch.library.register_fake(KL_STATS_OP)
        def _kl_stats_fake(z, z_ref, temperature, reverse):
            n = z.shape[0]
            return z.new_empty(n), z.new_empty(n), z.new_empty(n)

        @torch.library.register_fake(KL_GRAD_OP)
        def _kl_grad_fake(z, z_ref, lse, ref_lse, kl, g, temperature, reverse, into_ref=False):
            return None

        _native.no_derivative(KL_STATS_OP, "alignfast.linear_kl")
    _native.no_derivative(STATS_OP, "alignfast.linear_logprobs")


_AVAILABLE = available()  # once, at import: the wrappers below are traced by torch.compile
if _AVAILABLE:
    _register_fakes()


def _require() -> None:
    if not _AVAILABLE:
        raise RuntimeError("alignfast._C is not built (or failed to load), so the native row kernels of the "
                           "'cpp'/'cuda' backends are unavailable; rebuild with `pip install --no-build-isolation "
                           "-e .` or use backend='chunked'")


def _rows(g: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor | None:
    """An upstream per-row tensor as the kernels take it: [n], z's dtype, contiguous."""
    if g is None:
        return None
    return g.to(z.dtype).expand(z.shape[0]).contiguous()


def stats(z: torch.Tensor, targets: torch.Tensor, opts: LogitOptions) -> RowStats:
    """Per-row statistics of the raw logits block `z` [n, V] (left unchanged)."""
    _require()
    logprob, entropy, lse, zmean = torch.ops.alignfast.logprob_rows_stats(
        z, targets.long(), opts.temperature, opts.softcap, opts.with_entropy, opts.with_zmean)
    return RowStats(logprob, entropy if opts.with_entropy else None, lse, zmean if opts.with_zmean else None)


def grad_(z: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor | None,
          g_logprob: torch.Tensor | None, g_entropy: torch.Tensor | None, g_lse: torch.Tensor | None,
          g_zmean: torch.Tensor | None, opts: LogitOptions) -> torch.Tensor:
    """Overwrites the raw logits block `z` [n, V] with ∂L/∂z and returns it. A None gradient is 0."""
    _require()
    torch.ops.alignfast.logprob_rows_grad_(
        z, targets.long(), _rows(lse, z), _rows(entropy, z), _rows(g_logprob, z), _rows(g_entropy, z),
        _rows(g_lse, z), _rows(g_zmean, z), opts.temperature, opts.softcap)
    return z


def kl_stats(z: torch.Tensor, z_ref: torch.Tensor, temperature: float, reverse: bool):
    """(kl, lse, ref_lse), each [n] in z's dtype, of the raw logits blocks z and z_ref [n, V] (unchanged)."""
    _require()
    return torch.ops.alignfast.kl_rows_stats(z, z_ref, temperature, reverse)


def kl_grad_(z: torch.Tensor, z_ref: torch.Tensor, lse: torch.Tensor, ref_lse: torch.Tensor, kl: torch.Tensor,
             g: torch.Tensor, temperature: float, reverse: bool, *, into_ref: bool = False) -> torch.Tensor:
    """Overwrites the policy's raw logits block z [n, V] with ∂(Σ g·kl)/∂z and returns it; `into_ref`:
    overwrites z_ref instead (z stays as it was, for a pass that forms another gradient in it)."""
    _require()
    torch.ops.alignfast.kl_rows_grad_(z, z_ref, _rows(lse, z), _rows(ref_lse, z), _rows(kl, z), _rows(g, z),
                                      temperature, reverse, into_ref)
    return z_ref if into_ref else z
