"""Small models and reference computations shared by the tests."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize
from torch import nn


def tiny_cnn(channels: int = 3, classes: int = 4, *, bn: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Conv2d(channels, 4, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, classes)]
    return nn.Sequential(*layers)


class Linear(nn.Module):
    """f(x) = <w, x>: one output per sample; the attack's loss is the output itself."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x):
        return (x.flatten(1) * self.w.to(x.dtype)).sum(1)


def identity_loss(output, y):
    return output


def _shrink_into_ball(p: np.ndarray, x: np.ndarray, eps: float, order: int) -> np.ndarray:
    """Pulls a solver's answer straight towards x until it satisfies ||p - x|| <= eps.

    SLSQP stops with the ball constraint violated by up to ~1e-7, which makes its point look *closer* to z than the
    exact projection. Shrinking towards x (inside the box, which is convex and holds x) makes it feasible again.
    """
    r = np.linalg.norm(p - x, ord=order)
    return p if r <= eps else x + (p - x) * (eps / r)


def brute_force_projection(z: np.ndarray, x: np.ndarray, eps: float, norm: str, lo: float, hi: float) -> np.ndarray:
    """Solves min ||p - z||^2 s.t. ||p - x|| <= eps, lo <= p <= hi with SLSQP (l1 split into p - x = u - v)."""
    n = z.size
    if norm == "l1":
        # variables (u, v) >= 0 with d = u - v; sum(u + v) <= eps; lo <= x + u - v <= hi
        d0 = np.clip(z, lo, hi) - x
        w0 = np.concatenate([np.maximum(d0, 0), np.maximum(-d0, 0)])
        obj = lambda w: np.sum((x + w[:n] - w[n:] - z) ** 2)  # noqa: E731
        jac = lambda w: np.concatenate([2 * (x + w[:n] - w[n:] - z), -2 * (x + w[:n] - w[n:] - z)])  # noqa: E731
        cons = [
            {"type": "ineq", "fun": lambda w: eps - w.sum(), "jac": lambda w: -np.ones(2 * n)},
            {
                "type": "ineq",
                "fun": lambda w: hi - (x + w[:n] - w[n:]),
                "jac": lambda w: np.concatenate([-np.eye(n), np.eye(n)], 1),
            },
            {
                "type": "ineq",
                "fun": lambda w: (x + w[:n] - w[n:]) - lo,
                "jac": lambda w: np.concatenate([np.eye(n), -np.eye(n)], 1),
            },
        ]
        r = minimize(
            obj,
            w0,
            jac=jac,
            constraints=cons,
            bounds=[(0, None)] * (2 * n),
            method="SLSQP",
            options={"ftol": 1e-15, "maxiter": 1000},
        )
        return _shrink_into_ball(x + r.x[:n] - r.x[n:], x, eps, 1)
    if norm == "l2":
        obj = lambda p: np.sum((p - z) ** 2)  # noqa: E731
        jac = lambda p: 2 * (p - z)  # noqa: E731
        cons = [{"type": "ineq", "fun": lambda p: eps**2 - np.sum((p - x) ** 2), "jac": lambda p: -2 * (p - x)}]
        p0 = x.copy()
        r = minimize(
            obj,
            p0,
            jac=jac,
            constraints=cons,
            bounds=[(lo, hi)] * n,
            method="SLSQP",
            options={"ftol": 1e-15, "maxiter": 1000},
        )
        return _shrink_into_ball(np.clip(r.x, lo, hi), x, eps, 2)
    if norm == "linf":
        return np.clip(z, np.maximum(lo, x - eps), np.minimum(hi, x + eps))
    raise ValueError(norm)


def linear_optimum(w: np.ndarray, x: np.ndarray, eps: float, norm: str, lo: float, hi: float) -> np.ndarray:
    """The maximizer of <w, d> over ||d|| <= eps, lo <= x + d <= hi, in closed form (float64)."""
    up, down = hi - x, lo - x  # box room for d
    if norm == "linf":
        return np.where(w > 0, np.minimum(eps, up), np.where(w < 0, np.maximum(-eps, down), 0.0))
    if norm == "l1":
        # fractional knapsack: fill coordinates by decreasing |w_i| up to their box room in sign(w_i)
        d = np.zeros_like(w)
        left = eps
        for i in np.argsort(-np.abs(w), kind="stable"):
            if w[i] == 0 or left <= 0:
                break
            room = up[i] if w[i] > 0 else -down[i]
            take = min(room, left)
            d[i] = np.sign(w[i]) * take
            left -= take
        return d
    if norm == "l2":
        # d = clamp(t w, down, up) with the t at which ||d||_2 = eps (or all saturated): bisection on t
        def size(t):
            return np.linalg.norm(np.clip(t * w, down, up))

        hi_t = 1.0
        while size(hi_t) < eps and hi_t < 1e12:
            hi_t *= 2
        if size(hi_t) < eps:
            return np.clip(hi_t * w, down, up)
        lo_t = 0.0
        for _ in range(200):
            mid = (lo_t + hi_t) / 2
            lo_t, hi_t = (mid, hi_t) if size(mid) < eps else (lo_t, mid)
        return np.clip(lo_t * w, down, up)
    raise ValueError(norm)
