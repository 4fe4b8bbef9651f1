"""Checks at the public boundary. Kernels assume their input passed these."""
from __future__ import annotations

import math
import numbers

import torch

MAX_BIAS = 1e30  # beyond it, |bias|/T can overflow the entropy gradient's arithmetic (NaN)

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# gather/index_select take int64; int32 (what some tokenizers and collators hand out) is widened
TARGET_DTYPES = (torch.int64, torch.int32)


def is_real(value) -> bool:
    """A real number, numpy scalars included; not a bool (True is an int in Python, never a coefficient)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def require_tensor(name: str, value, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype} "
                         f"(shape {_shape(t)})")


def check_linear_head(hidden, weight, bias=None, *, prefix: str = "") -> None:
    """hidden [..., H], weight [V, H], bias [V] | None: shapes, dtypes, devices."""
    h, w, b = f"{prefix}hidden", f"{prefix}weight", f"{prefix}bias"
    require_tensor(h, hidden)
    require_tensor(w, weight)
    require_tensor(b, bias, optional=True)
    check_float(h, hidden)
    check_float(w, weight)
    if hidden.device.type == "meta":  # the ops read values (targets' range, bias finiteness, ...)
        raise ValueError(f"{h} is a meta tensor (shape {_shape(hidden)}); the ops need real data")
    if hidden.dim() < 2:
        raise ValueError(f"{h} must be [N, H] or [B, T, H], got shape {_shape(hidden)}")
    if weight.dim() != 2:
        raise ValueError(f"{w} must be 2-D [V, H], got shape {_shape(weight)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{h} {_shape(hidden)} and {w} {_shape(weight)} disagree on H: "
                         f"{hidden.shape[-1]} != {weight.shape[1]}")
    if weight.shape[0] == 0:
        raise ValueError(f"{w} has an empty vocabulary, shape {_shape(weight)}")
    if weight.shape[1] == 0:
        raise ValueError(f"{h} {_shape(hidden)} and {w} {_shape(weight)} have no features (H=0)")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{h} ({hidden.dtype}) and {w} ({weight.dtype}) must have the same dtype")
    if hidden.device != weight.device:
        raise ValueError(f"{h} is on {hidden.device} but {w} is on {weight.device}")
    if bias is not None:
        check_float(b, bias)
        if bias.dtype != weight.dtype:
            raise ValueError(f"{b} ({bias.dtype}) and {w} ({weight.dtype}) must have the same dtype")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{b} must be [V]={weight.shape[0]}, got shape {_shape(bias)}")
        if bias.device != weight.device:
            raise ValueError(f"{b} is on {bias.device} but {w} is on {weight.device}")
        # −inf masks: 0·(−inf) = NaN in entropies and gradients; so do near-overflow ones (finfo.min, −1e38):
        # log p ≈ b/T times the entropy's upstream gradient overflows to −inf, then meets p = 0
        if not bool((bias.abs() < MAX_BIAS).all()):
            raise ValueError(f"{b} (shape {_shape(bias)}) must be finite with |entries| < {MAX_BIAS:g}; to mask vocabulary entries use a "
                             f"large negative value such as -1e4 (not -inf or finfo.min)")


def check_targets(targets, hidden: torch.Tensor, vocab: int, ignore_index: int, *, name: str = "targets") -> None:
    """targets has hidden's leading shape, an integer dtype, and values in [0, V) or ignore_index."""
    require_tensor(name, targets)
    if targets.dtype not in TARGET_DTYPES:
        raise ValueError(f"{name} must be an int64 (or int32) tensor of token ids, got {targets.dtype} "
                         f"(shape {_shape(targets)})")
    check_ignore_index(ignore_index)
    info = torch.iinfo(targets.dtype)
    if not info.min <= ignore_index <= info.max:  # `targets != ignore_index` would wrap it (2**32 -> 0 in int32)
        raise ValueError(f"ignore_index={ignore_index} does not fit {name}'s dtype {targets.dtype} (shape "
                         f"{_shape(targets)}); pass int64 {name}")
    if _shape(targets) != _shape(hidden)[:-1]:
        raise ValueError(f"{name} shape {_shape(targets)} must equal hidden's leading shape "
                         f"{_shape(hidden)[:-1]} (hidden is {_shape(hidden)})")
    if targets.device != hidden.device:
        raise ValueError(f"{name} is on {targets.device} but hidden is on {hidden.device}")
    if targets.numel():
        valid = targets[targets != ignore_index]
        if valid.numel() and bool(((valid < 0) | (valid >= vocab)).any()):
            bad = valid[(valid < 0) | (valid >= vocab)][0].item()
            raise ValueError(f"{name} holds {bad}, outside [0, V={vocab}) and not ignore_index={ignore_index}")


def check_ignore_index(ignore_index) -> None:
    if not is_int(ignore_index) or not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must be an int (in int64's range), got {ignore_index!r}")


def check_positive(name: str, value, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_temperature(value) -> None:
    """> 0 with a reciprocal that fits float32 (logits are multiplied by 1/T; 1e-45 would make them inf)."""
    check_positive("temperature", value)
    if not 1.0 / value < 3.0e38:
        raise ValueError(f"temperature={value!r} is too small: 1/temperature must fit in float32")


def check_softcap(value) -> None:
    """None, or > 0 with it and its reciprocal in float32's range (the kernels form z/softcap in fp32)."""
    check_positive("softcap", value, optional=True)
    if value is not None and not (value < 3.0e38 and 1.0 / value < 3.0e38):
        raise ValueError(f"softcap={value!r} is out of range: softcap and 1/softcap must fit in float32")


def check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (not is_int(chunk_size) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
