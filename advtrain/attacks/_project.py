"""Public projection onto an eps-ball intersected with the pixel box."""

from __future__ import annotations

import torch
from torch import Tensor

from advtrain.attacks import _checks
from advtrain.attacks._projections import Norm, project_delta


def project(
    x_adv: Tensor, x: Tensor, *, eps: float | Tensor, norm: Norm, bounds: tuple[float, float] = (0.0, 1.0)
) -> Tensor:
    r"""Euclidean projection of ``x_adv`` onto :math:`\{z : \|z - x\| \le \epsilon,\ lo \le z \le hi\}`.

    .. math::
        \Pi(z) = \arg\min_{\|z' - x\|_p \le \epsilon,\ lo \le z' \le hi} \|z' - z\|_2

    Exact for each norm: a clamp for l_inf; for l_2 a scale-then-clamp whose scale is found by sorting the
    breakpoints of a piecewise quadratic; for l_1 a soft threshold with box caps (AutoAttack's l1-APGD
    projection). Computed in float32 (float64 for float64 inputs); the result is cast to ``x_adv``'s dtype.

    Args:
        x_adv: ``(B, ...)`` points to project (any finite values).
        x: ``(B, ...)`` ball centers inside ``bounds``.
        eps: radius ``>= 0``, a float or a ``(B,)`` tensor.
        norm: ``"linf"``, ``"l2"`` or ``"l1"``.
        bounds: the box ``(lo, hi)``.

    Returns:
        A detached tensor shaped like ``x_adv``.

    Raises:
        ValueError / TypeError: as :func:`advtrain.pgd` for ``x``, ``eps``, ``norm`` and ``bounds``; when the shapes
        of ``x_adv`` and ``x`` differ; NaN or inf in ``x_adv``.

    Example:
        >>> import torch
        >>> x = torch.full((1, 4), 0.5)
        >>> project(torch.tensor([[2.0, 0.5, 0.5, 0.5]]), x, eps=0.3, norm="l1")
        tensor([[0.8000, 0.5000, 0.5000, 0.5000]])

    References:
        Croce & Hein, "Mind the box: l1-APGD for sparse adversarial attacks", arXiv 2103.01208.
    """
    lo, hi = _checks.check_bounds(bounds)
    _checks.check_images(x, (lo, hi))
    _checks.check_norm(norm)
    if not isinstance(x_adv, Tensor) or not x_adv.is_floating_point():
        raise TypeError(f"x_adv must be a floating tensor; got {getattr(x_adv, 'dtype', type(x_adv).__name__)}")
    if x_adv.shape != x.shape:
        raise ValueError(f"x_adv and x must have the same shape; got {tuple(x_adv.shape)} and {tuple(x.shape)}")
    if not bool(torch.isfinite(x_adv).all()):
        raise ValueError("x_adv holds NaN or inf values")
    work = torch.float64 if torch.float64 in (x.dtype, x_adv.dtype) else torch.float32
    e = _checks.as_eps(eps, x.shape[0], x.device, work)
    xw = x.detach().flatten(1).to(work)
    d = x_adv.detach().flatten(1).to(work) - xw
    out = xw + project_delta(d, lo - xw, hi - xw, e, norm)
    return out.view(x_adv.shape).to(x_adv.dtype)
