"""Projection invariants: inside points unchanged, outside points on the boundary, idempotence, brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from advtrain.attacks import project
from advtrain.attacks._projections import norm_of
from tests.helpers import brute_force_projection

NORMS = ["linf", "l2", "l1"]


def _draw(seed: int, batch: int, n: int, scale: float, lo: float = 0.0, hi: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    x = lo + (hi - lo) * torch.rand(batch, n, generator=g, dtype=torch.float64)
    # pin some coordinates to the box faces: the box constraint is then active in the projection
    pin = torch.rand(batch, n, generator=g, dtype=torch.float64)
    x = torch.where(pin < 0.15, torch.full_like(x, lo), torch.where(pin > 0.85, torch.full_like(x, hi), x))
    z = x + scale * torch.randn(batch, n, generator=g, dtype=torch.float64)
    return x, z


@pytest.mark.parametrize("norm", NORMS)
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 4),
    n=st.integers(1, 40),
    eps=st.floats(0.0, 3.0),
    scale=st.floats(0.01, 4.0),
)
def test_projection_is_feasible_idempotent_and_moves_only_outside_points(norm, seed, batch, n, eps, scale):
    x, z = _draw(seed, batch, n, scale)
    p = project(z, x, eps=eps, norm=norm)
    d = p - x
    tol = 1e-9 * max(1.0, eps)
    assert (norm_of(d, norm) <= eps + tol).all()
    assert (p >= -1e-12).all() and (p <= 1 + 1e-12).all()
    # idempotent
    assert torch.allclose(project(p, x, eps=eps, norm=norm), p, atol=1e-9, rtol=0)
    # inside points are unchanged; outside points land on the boundary of the ball or of the box
    inside = (norm_of(z - x, norm) <= eps) & ((z >= 0) & (z <= 1)).all(1)
    assert torch.allclose(p[inside], z[inside], atol=1e-12, rtol=0)
    out_ball = norm_of(z - x, norm) > eps
    on_sphere = (norm_of(d, norm) - eps).abs() <= 1e-9 * max(1.0, eps)
    on_box_face = ((p <= 1e-12) | (p >= 1 - 1e-12)).any(1)
    assert (on_sphere | on_box_face | ~out_ball).all()


@pytest.mark.parametrize("norm", NORMS)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6), eps=st.floats(0.05, 2.0), scale=st.floats(0.1, 2.0))
@settings(max_examples=60)
def test_projection_matches_a_brute_force_solver(norm, seed, n, eps, scale):
    x, z = _draw(seed, 1, n, scale)
    p = project(z, x, eps=eps, norm=norm)[0].numpy()
    ref = brute_force_projection(z[0].numpy(), x[0].numpy(), eps, norm, 0.0, 1.0)
    # the projection is the unique minimizer: compare distances first (solver-tolerance robust), then points
    dist_p, dist_ref = np.sum((p - z[0].numpy()) ** 2), np.sum((ref - z[0].numpy()) ** 2)
    assert dist_p <= dist_ref + 1e-7
    np.testing.assert_allclose(p, ref, atol=2e-4)


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_projection_is_not_a_rescaling(norm):
    # a point far outside the ball, with one coordinate against the box: rescaling to norm eps is wrong
    x = torch.tensor([[1.0, 0.5, 0.5]], dtype=torch.float64)
    z = torch.tensor([[2.0, 1.0, 0.5]], dtype=torch.float64)
    p = project(z, x, eps=0.3, norm=norm)
    assert p[0, 0] == 1.0  # pinned at the box face: the box takes that coordinate, the ball the rest
    assert torch.isclose(norm_of(p - x, norm), torch.tensor([0.3], dtype=torch.float64)).all()
    assert torch.isclose(p[0, 1], torch.tensor(0.8, dtype=torch.float64))


def test_l1_projection_against_autoattack_reference():
    aa = pytest.importorskip("pyautoattack.autopgd_base")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 200, generator=g)
    t = 0.5 * torch.randn(8, 200, generator=g)
    ref = x + t + aa.L1_projection(x, t, 3.0)
    ours = project((x + t), x, eps=3.0, norm="l1")
    assert torch.allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("norm", NORMS)
def test_projection_supports_per_sample_eps(norm):
    x, z = _draw(3, 5, 30, 2.0)
    eps = torch.tensor([0.0, 0.1, 0.5, 1.0, 2.0], dtype=torch.float64)
    p = project(z, x, eps=eps, norm=norm)
    for i in range(5):
        assert torch.allclose(p[i : i + 1], project(z[i : i + 1], x[i : i + 1], eps=float(eps[i]), norm=norm))
    assert torch.allclose(p[0], x[0], atol=1e-12, rtol=0)


def test_l2_projection_keeps_a_point_on_the_sphere_whose_breakpoints_tie():
    """Regression: every breakpoint at t = 1 (a clamped point on the sphere) made rounding put the closed-form
    scale at 0, so projecting a feasible point returned x itself (found by the ci profile's examples)."""
    x, z = _draw(463, 4, 30, 0.15750993081450007)
    eps = 0.14400693613712884
    p = project(z, x, eps=eps, norm="l2")
    assert torch.allclose(project(p, x, eps=eps, norm="l2"), p, atol=1e-12, rtol=0)
