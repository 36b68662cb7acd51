"""Input validation shared by the token reducers: every check runs before any work and names the bad value."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor


def check_keep_ratio(keep_ratio: Any) -> float:
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, numbers.Real):
        raise TypeError(f"keep_ratio must be a number in (0, 1]; got {keep_ratio!r}")
    if not (math.isfinite(keep_ratio) and 0 < keep_ratio <= 1):
        raise ValueError(f"keep_ratio must be in (0, 1]; got {keep_ratio}")
    return float(keep_ratio)


def check_count(value: Any, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return int(value)


def check_pair(value: Any, name: str) -> tuple[int, int]:
    """An int ``n`` as ``(n, n)``, or a pair of ints; both ``>= 1``."""
    pair = (value, value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value
    try:
        a, b = pair
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an int or a pair of ints (h, w); got {value!r}") from None
    return check_count(a, f"{name}[0]", minimum=1), check_count(b, f"{name}[1]", minimum=1)


def check_tokens(tokens: Any, num_prefix_tokens: Any) -> int:
    """Raises unless ``tokens`` is ``(B, P + N, D)`` with ``N >= 1``; returns ``P``."""
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be a torch.Tensor; got {type(tokens).__name__}")
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be (B, N, D); got shape {tuple(tokens.shape)}")
    p = check_count(num_prefix_tokens, "num_prefix_tokens", minimum=0)
    if p >= tokens.shape[1]:
        raise ValueError(f"tokens of shape {tuple(tokens.shape)} hold no patch token after {p} prefix tokens")
    return p


def check_indices(indices: Any, batch: int, num_patches: int) -> None:
    """Raises unless ``indices`` is a ``(B, K)`` int64 tensor with ``1 <= K <= N`` (values are not read)."""
    if not isinstance(indices, Tensor):
        raise TypeError(f"indices must be a torch.Tensor; got {type(indices).__name__}")
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be int64; got dtype {indices.dtype}")
    if indices.ndim != 2 or indices.shape[0] != batch or not 1 <= indices.shape[1] <= num_patches:
        raise ValueError(
            f"indices must be (B, K) = ({batch}, K) with 1 <= K <= {num_patches} patch tokens; "
            f"got shape {tuple(indices.shape)}"
        )


def check_images(x: Any, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor of pixels; got dtype {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"{name} must be (B, C, H, W) images; got shape {tuple(x.shape)}")
