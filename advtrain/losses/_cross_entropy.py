"""Cross-entropy with integer labels or soft targets, with a per-sample output for attacks."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Reduction = Literal["none", "mean", "sum"]


def cross_entropy(
    logits: Tensor, target: Tensor, *, label_smoothing: float = 0.0, reduction: Reduction = "mean"
) -> Tensor:
    r"""Cross-entropy of ``logits`` against integer labels or soft target distributions.

    .. math::
        \ell_i = -\sum_k q_{ik} \log \mathrm{softmax}(z_i)_k,\qquad
        q_i = (1 - s)\, t_i + s / K,

    where :math:`t_i` is the one-hot label (integer targets) or the given distribution (soft targets, e.g. from
    timm's ``Mixup``) and :math:`s` is ``label_smoothing``. Computed in float32 (or float64) whatever the logits'
    dtype, so it is safe under bf16 autocast.

    Args:
        logits: ``(B, K)`` unnormalized scores.
        target: ``(B,)`` int64 class indices in ``[0, K)``, or ``(B, K)`` float distributions (rows sum to 1).
        label_smoothing: ``s`` in ``[0, 1)``.
        reduction: ``"none"`` for the ``(B,)`` per-sample losses (what attacks need), ``"mean"`` or ``"sum"``.

    Returns:
        ``(B,)`` losses for ``reduction="none"``, else a scalar.

    Raises:
        ValueError: on shapes that do not match, ``label_smoothing`` outside ``[0, 1)``, or an unknown reduction.
        TypeError: when integer targets are not an integer dtype or soft targets are not floating.

    Example:
        >>> import torch
        >>> z = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> hard = cross_entropy(z, torch.tensor([0, 1]), reduction="none")
        >>> soft = cross_entropy(z, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), reduction="none")
        >>> torch.allclose(hard, soft)
        True
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be (B, K); got shape {tuple(logits.shape)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing}")
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum'; got {reduction!r}")
    b, k = logits.shape
    z = logits if logits.dtype == torch.float64 else logits.float()
    if target.ndim == 1:
        if target.shape[0] != b:
            raise ValueError(f"target has {target.shape[0]} labels for {b} logits rows")
        if target.is_floating_point() or target.is_complex():
            raise TypeError(f"integer targets must be an integer dtype; got {target.dtype}")
        loss = F.cross_entropy(z, target.long(), reduction="none", label_smoothing=label_smoothing)
    elif target.ndim == 2:
        if tuple(target.shape) != (b, k):
            raise ValueError(f"soft targets must match logits {tuple(logits.shape)}; got {tuple(target.shape)}")
        if not target.is_floating_point():
            raise TypeError(f"soft targets must be floating; got {target.dtype}")
        q = target.to(z.dtype)
        if label_smoothing:
            q = q * (1.0 - label_smoothing) + label_smoothing / k
        loss = -(q * F.log_softmax(z, dim=1)).sum(1)
    else:
        raise ValueError(f"target must be (B,) labels or (B, K) distributions; got shape {tuple(target.shape)}")
    match reduction:
        case "none":
            return loss
        case "mean":
            return loss.mean()
        case "sum":
            return loss.sum()
