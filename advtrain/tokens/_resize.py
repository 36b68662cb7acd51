"""Resizing as a token reducer: fewer pixels, so fewer patches."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from advtrain.tokens import _checks


def resize_reduce(x: Tensor, size: int | tuple[int, int]) -> Tensor:
    r"""Downsizes ``(B, C, H, W)`` images with anti-aliased bilinear interpolation.

    Each output pixel is a convex combination of input pixels under a triangle filter stretched by the scale
    factor :math:`s = H / h \ge 1` (the ``antialias=True`` path of :func:`torch.nn.functional.interpolate`,
    as PIL's bilinear resize), so no frequency above the new Nyquist limit aliases. A ViT with patch size
    :math:`p` then sees :math:`(h / p)(w / p)` patches instead of :math:`(H / p)(W / p)`: AdvXL's default
    reducer takes 224 px to 112 px, keeping 25% of the tokens. The result is clamped to the range of ``x``
    (a convex combination cannot leave it; floating rounding could, by an ulp), so pixels in ``[0, 1]`` stay
    there and the result is a valid input to an attack. The op is differentiable. bfloat16 and float16
    inputs are resized in float32 and rounded back.

    Args:
        x: ``(B, C, H, W)`` floating images.
        size: the output ``(h, w)`` with ``1 <= h <= H`` and ``1 <= w <= W``; an int ``n`` means ``(n, n)``.

    Returns:
        ``(B, C, h, w)`` images of ``x``'s dtype and device; a copy of ``x`` when ``(h, w) == (H, W)``.

    Raises:
        TypeError: a non-tensor or non-floating ``x``; a ``size`` that is not an int or a pair of ints.
        ValueError: ``x`` not 4-D; a ``size`` below 1 or above the input's (upsampling is not a reduction).

    Example:
        >>> import torch
        >>> x = torch.rand(2, 3, 224, 224)
        >>> resize_reduce(x, 112).shape
        torch.Size([2, 3, 112, 112])
        >>> bool((resize_reduce(torch.ones(1, 3, 8, 8), (4, 2)) == 1).all())
        True

    References:
        Wang et al., "Revisiting Adversarial Training at Scale" (AdvXL, Sec. 3.2), arXiv 2401.04727.
        Li et al., "Scaling Language-Image Pre-training via Masking" (FLIP), arXiv 2212.00794.
    """
    _checks.check_images(x)
    h, w = _checks.check_pair(size, "size")
    if h > x.shape[2] or w > x.shape[3]:
        raise ValueError(
            f"size {(h, w)} is larger than the input's {tuple(x.shape[2:])} (x of shape {tuple(x.shape)}); "
            f"upsampling is not a token reduction"
        )
    if (h, w) == tuple(x.shape[2:]):
        return x.clone()
    if x.numel() == 0:
        return x.new_empty((*x.shape[:2], h, w))
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    if w == 1 and h > 1:
        # torch's CPU kernel gets a one-column output wrong (rows repeat); the transposed problem is right
        out = _aa_bilinear(work.transpose(2, 3), (w, h)).transpose(2, 3)
    else:
        out = _aa_bilinear(work, (h, w))
    out = out.to(x.dtype)
    lo, hi = x.detach().amin(), x.detach().amax()
    return out.clamp(min=lo, max=hi)


def _aa_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
