"""Exact Euclidean projections onto a norm ball intersected with a box.

All functions here work on flattened perturbations ``delta`` of shape ``(B, n)`` with per-sample box limits
``lo <= 0 <= hi`` (the box ``bounds`` translated by ``-x``) and per-sample radii ``eps`` of shape ``(B,)``. They
are exact in exact arithmetic; floating-point rounding is the only error.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Norm = Literal["linf", "l2", "l1"]


def project_linf(delta: Tensor, lo: Tensor, hi: Tensor, eps: Tensor) -> Tensor:
    r"""Projects onto :math:`\{d : \|d\|_\infty \le \epsilon,\ lo \le d \le hi\}`.

    The set is a box, so the projection is a coordinate-wise clamp to
    :math:`[\max(-\epsilon, lo), \min(\epsilon, hi)]`.

    Args:
        delta: ``(B, n)`` perturbations.
        lo: ``(B, n)`` lower box limits, ``<= 0``.
        hi: ``(B, n)`` upper box limits, ``>= 0``.
        eps: ``(B,)`` radii, ``>= 0``.

    Returns:
        ``(B, n)`` projected perturbations.
    """
    e = eps.unsqueeze(1)
    return torch.minimum(torch.maximum(delta, torch.maximum(lo, -e)), torch.minimum(hi, e))


def project_l2(delta: Tensor, lo: Tensor, hi: Tensor, eps: Tensor) -> Tensor:
    r"""Projects onto :math:`\{d : \|d\|_2 \le \epsilon,\ lo \le d \le hi\}`.

    The KKT conditions give :math:`d^\star = \mathrm{clamp}(t\,\delta, lo, hi)` for a scale
    :math:`t \in [0, 1]`: :math:`t = 1` when the clamped point is inside the ball, otherwise the unique :math:`t`
    with :math:`\|\mathrm{clamp}(t\delta, lo, hi)\|_2 = \epsilon`. The squared norm
    :math:`g(t) = \sum_{\tau_i \le t} c_i^2 + t^2 \sum_{\tau_i > t} \delta_i^2` is piecewise quadratic with a
    breakpoint :math:`\tau_i` where coordinate :math:`i` reaches its box limit :math:`c_i`; sorting the breakpoints
    finds the segment that holds :math:`g(t) = \epsilon^2` and solves it in closed form.

    Args:
        delta: ``(B, n)`` perturbations.
        lo: ``(B, n)`` lower box limits, ``<= 0``.
        hi: ``(B, n)`` upper box limits, ``>= 0``.
        eps: ``(B,)`` radii, ``>= 0``.

    Returns:
        ``(B, n)`` projected perturbations.
    """
    c = torch.clamp(delta, lo, hi)
    eps2 = eps.square()
    inside = c.square().sum(1) <= eps2  # no early exit: a host sync per step would stall the GPU
    nonzero = delta != 0
    # tau_i = c_i / delta_i in [0, 1]: the scale at which coordinate i saturates (1: not before t = 1).
    tau = torch.where(nonzero, c / torch.where(nonzero, delta, 1), 1).clamp(0, 1)
    tau_s, order = tau.sort(1)
    c2 = c.gather(1, order).square()
    d2 = delta.gather(1, order).square()
    sat = c2.cumsum(1)  # C_k: squared norm of the saturated coordinates 1..k
    rev = d2.flip(1).cumsum(1).flip(1)
    free = torch.cat([rev[:, 1:], torch.zeros_like(rev[:, :1])], 1)  # S_k: sum of delta_j^2 over j > k
    g = sat + tau_s.square() * free  # g(tau_(k)), nondecreasing in k
    m = (g <= eps2.unsqueeze(1)).sum(1, keepdim=True)  # number of saturated coordinates at t*
    k = (m - 1).clamp(min=0)
    sat_m = torch.where(m > 0, sat.gather(1, k), 0)
    free_m = torch.where(m > 0, free.gather(1, k), d2.sum(1, keepdim=True))
    t = ((eps2.unsqueeze(1) - sat_m).clamp(min=0) / free_m.clamp(min=torch.finfo(delta.dtype).tiny)).sqrt()
    # t* lies in [tau_(m), tau_(m+1)]: rounding can make g non-monotone (ties of tau at 1 summed in two orders)
    # and the closed form fall below tau_(m), which would pull saturated coordinates off their limits
    t = torch.maximum(t, torch.where(m > 0, tau_s.gather(1, k), 0))
    t = torch.where(m == delta.shape[1], 1, t)  # g(1) <= eps^2 after rounding: the clamped point is inside
    out = torch.clamp(t.clamp(max=1) * delta, lo, hi)
    return torch.where(inside.unsqueeze(1), c, out)


def project_l1(delta: Tensor, lo: Tensor, hi: Tensor, eps: Tensor) -> Tensor:
    r"""Projects onto :math:`\{d : \|d\|_1 \le \epsilon,\ lo \le d \le hi\}` (box-aware, as AutoAttack's l1-APGD).

    The KKT conditions give a soft threshold followed by the box:
    :math:`d^\star_i = \mathrm{sign}(\delta_i)\,\mathrm{clamp}(|\delta_i| - \lambda, 0, u_i)`, with :math:`u_i` the
    room the box leaves in the direction of :math:`\delta_i`, and :math:`\lambda \ge 0` the root of
    :math:`h(\lambda) = \sum_i \mathrm{clamp}(|\delta_i| - \lambda, 0, u_i) = \epsilon` (or 0 when the clamped point
    is inside the ball). :math:`h` is piecewise linear and nonincreasing with breakpoints :math:`|\delta_i| - u_i`
    and :math:`|\delta_i|`; sorting them finds the segment of the root, which is then solved linearly. Rescaling a
    vector to norm :math:`\epsilon` is *not* this projection.

    Args:
        delta: ``(B, n)`` perturbations.
        lo: ``(B, n)`` lower box limits, ``<= 0``.
        hi: ``(B, n)`` upper box limits, ``>= 0``.
        eps: ``(B,)`` radii, ``>= 0``.

    Returns:
        ``(B, n)`` projected perturbations.

    References:
        Croce & Hein, "Mind the box: l1-APGD for sparse adversarial attacks", NeurIPS 2021, arXiv 2103.01208.
    """
    c = torch.clamp(delta, lo, hi)
    inside = c.abs().sum(1) <= eps  # no early exit: a host sync per step would stall the GPU
    mag = delta.abs()
    room = torch.where(delta >= 0, hi, -lo)  # u_i >= 0
    points = torch.cat([mag - room, mag], 1)
    slopes = torch.cat([-torch.ones_like(mag), torch.ones_like(mag)], 1)
    p_s, order = points.sort(1)
    slope_after = slopes.gather(1, order).cumsum(1)  # slope of h right of each breakpoint
    steps = slope_after[:, :-1] * p_s.diff(dim=1)
    h = room.sum(1, keepdim=True) + torch.cat([torch.zeros_like(steps[:, :1]), steps.cumsum(1)], 1)
    e = eps.unsqueeze(1)
    k = (h > e).sum(1, keepdim=True).clamp(1, h.shape[1] - 1) - 1  # last breakpoint with h > eps
    denom = (-slope_after.gather(1, k)).clamp(min=1)
    lam = (p_s.gather(1, k) + (h.gather(1, k) - e) / denom).clamp(min=0)
    out = delta.sign() * torch.minimum((mag - lam).clamp(min=0), room)
    return torch.where(inside.unsqueeze(1), c, out)


def project_delta(delta: Tensor, lo: Tensor, hi: Tensor, eps: Tensor, norm: Norm) -> Tensor:
    """Dispatches to the exact projection for ``norm`` (flattened ``(B, n)`` inputs)."""
    match norm:
        case "linf":
            return project_linf(delta, lo, hi, eps)
        case "l2":
            return project_l2(delta, lo, hi, eps)
        case "l1":
            return project_l1(delta, lo, hi, eps)
    raise ValueError(f"unknown norm {norm!r}; expected one of 'linf', 'l2', 'l1'")


def norm_of(delta: Tensor, norm: Norm) -> Tensor:
    """Per-sample norm of a flattened ``(B, n)`` perturbation."""
    match norm:
        case "linf":
            return delta.abs().amax(1)
        case "l2":
            return delta.square().sum(1).sqrt()
        case "l1":
            return delta.abs().sum(1)
    raise ValueError(f"unknown norm {norm!r}; expected one of 'linf', 'l2', 'l1'")
