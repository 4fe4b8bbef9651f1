"""Checks shared by the functional losses: tensor shapes, hyper-parameters, the compute dtype.

Every public loss validates up front and raises `ValueError` naming the offending argument
and its shape; the arithmetic below the checks assumes validated input.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from alignfast.ops.validation import check_float, check_positive, is_real, require_tensor  # noqa: F401 (re-exported)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype the losses compute in: float32 for half/bfloat16/float32 inputs, float64 for float64."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def check_floats(tensors: Mapping[str, torch.Tensor | None], *, ndim: int | Iterable[int] | None = None,
                 same_shape: bool = True) -> None:
    """Each named tensor (None entries skipped) is a float tensor with `ndim` dims, all of one shape and device."""
    allowed = None if ndim is None else ({ndim} if isinstance(ndim, int) else set(ndim))
    present = [(name, t) for name, t in tensors.items() if t is not None]
    for name, t in present:
        require_tensor(name, t)
        check_float(name, t)
        if allowed is not None and t.dim() not in allowed:
            dims = " or ".join(f"{d}-D" for d in sorted(allowed))
            raise ValueError(f"{name} must be {dims}, got shape {_shape(t)}")
    if not present:
        return
    first_name, first = present[0]
    for name, t in present[1:]:
        if same_shape and t.shape != first.shape:
            listing = ", ".join(f"{n} {_shape(x)}" for n, x in present)
            raise ValueError(f"{name} {_shape(t)} does not match {first_name} {_shape(first)}; got {listing}")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def check_mask(mask, like: torch.Tensor, *, like_name: str, name: str = "mask") -> None:
    """mask is a bool/integer/float tensor of `like`'s shape on its device, with finite entries >= 0."""
    require_tensor(name, mask)
    if mask.dtype.is_complex:
        raise ValueError(f"{name} must be bool, integer or float, got {mask.dtype}")
    if mask.shape != like.shape:
        raise ValueError(f"{name} {_shape(mask)} does not match {like_name} {_shape(like)}")
    if mask.device != like.device:
        raise ValueError(f"{name} is on {mask.device} but {like_name} is on {like.device}")
    if mask.dtype != torch.bool and bool(((mask < 0) | ~torch.isfinite(mask)).any()):
        raise ValueError(f"{name} must hold weights >= 0 (1 for a counted token, 0 for a skipped one); it holds "
                         f"negative or non-finite entries")


def check_binary(name: str, labels) -> None:
    """labels is a bool tensor, or an integer one holding only 0 and 1 (a float 0.2 is not a label)."""
    require_tensor(name, labels)
    if labels.dtype == torch.bool:
        return
    if labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise ValueError(f"{name} must be bool (or 0/1 integers), got {labels.dtype}")
    other = labels[(labels != 0) & (labels != 1)]
    if other.numel():
        raise ValueError(f"{name} must be bool (or 0/1 integers), got {labels.dtype} holding "
                         f"{sorted(set(other.tolist()))[:3]}")


def check_lengths(name: str, lengths, batch: int, device: torch.device) -> None:
    """lengths is a [B] tensor of token counts (any real dtype)."""
    require_tensor(name, lengths)
    if lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise ValueError(f"{name} must hold token counts (integer or float), got {lengths.dtype}")
    if lengths.shape != (batch,):
        raise ValueError(f"{name} must be [B]=({batch},), got shape {_shape(lengths)}")
    if lengths.device != device:
        raise ValueError(f"{name} is on {lengths.device} but the log-probs are on {device}")


def check_rows(name: str, x, labels: torch.Tensor, *, per_token: bool = True, per_row: bool = True) -> None:
    """A fused loss's per-sequence input: a float tensor shaped like labels [B, T] (per_token) or [B]
    (per_row), on labels' device. The fused path takes each chunk's rows of it, so a wrong leading
    size must fail here, before it can fail as an index error or be read as other rows."""
    require_tensor("labels", labels)
    require_tensor(name, x)
    check_float(name, x)
    shapes = ([tuple(labels.shape)] if per_token else []) + ([tuple(labels.shape[:1])] if per_row else [])
    if tuple(x.shape) not in shapes:
        want = " or ".join(("[B, T]=" if len(s) == 2 else "[B]=") + str(s) for s in shapes)
        raise ValueError(f"{name} must be {want} (labels are {_shape(labels)}), got shape {_shape(x)}")
    if x.device != labels.device:
        raise ValueError(f"{name} is on {x.device} but labels are on {labels.device}")


def check_choice(name: str, value, valid: Iterable[str]) -> None:
    valid = list(valid)
    if value not in valid:
        raise ValueError(f"{name}={value!r} is unknown; valid values are {valid}")


def check_nonnegative(name: str, value) -> None:
    if not is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_finite(name: str, value) -> None:
    if not is_real(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_label_smoothing(value) -> None:
    if not is_real(value) or not 0.0 <= value < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {value!r}")
