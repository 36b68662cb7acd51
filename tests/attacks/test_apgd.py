"""Auto-PGD: the attack contract, its step-size schedule, and a cross-check against AutoAttack's APGD-CE."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from advtrain.attacks import apgd, pgd
from advtrain.attacks._apgd import _checkpoints
from advtrain.attacks._projections import norm_of, project_delta
from advtrain.losses import cross_entropy
from tests.attacks.test_attacks import Mlp, _eps_norm_scale
from tests.helpers import Linear, identity_loss, linear_optimum, tiny_cnn

NORMS = ["linf", "l2", "l1"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _concave(c: torch.Tensor):
    """A loss with its maximum at ``x + delta = c``: ``-||z - c||^2`` per sample."""
    return lambda out, y: -(out.flatten(1) - c.to(out.dtype)).square().sum(1)


def _identity(z):
    return z.flatten(1)


# ---------------------------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("norm", NORMS)
@given(
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from(DTYPES),
    shape=st.sampled_from([(1, 3), (2, 1, 4, 4), (3, 3, 2, 5), (4, 12), (2, 2, 3, 3)]),
    eps_frac=st.floats(0.0, 0.6),
    per_sample=st.booleans(),
    pin=st.floats(0.0, 0.5),
    steps=st.integers(0, 6),
    targeted=st.booleans(),
    random_start=st.booleans(),
    sparsity=st.floats(0.01, 1.0),
)
def test_no_output_leaves_the_ball_or_the_box(
    norm, seed, dtype, shape, eps_frac, per_sample, pin, steps, targeted, random_start, sparsity
):
    g = torch.Generator().manual_seed(seed)
    n = int(np.prod(shape[1:]))
    x = torch.rand(shape, generator=g)
    u = torch.rand(shape, generator=g)
    x = torch.where(u < pin / 2, 0.0, torch.where(u > 1 - pin / 2, 1.0, x)).to(dtype)  # pixels on the box faces
    y = torch.randint(0, 3, (shape[0],), generator=g)
    scale = _eps_norm_scale(norm, n)
    eps = torch.rand(shape[0], generator=g, dtype=torch.float64) * eps_frac * scale if per_sample else eps_frac * scale
    out = apgd(
        Mlp(n, seed=seed % 7),
        x,
        y,
        eps=eps,
        steps=steps,
        norm=norm,
        targeted=targeted,
        random_start=random_start,
        l1_sparsity=sparsity,
        generator=torch.Generator().manual_seed(seed),
    )
    assert out.shape == x.shape and out.dtype == x.dtype and not out.requires_grad
    d = (out.double() - x.double()).flatten(1)
    e = eps if isinstance(eps, torch.Tensor) else torch.full((shape[0],), float(eps), dtype=torch.float64)
    assert (norm_of(d, norm) <= e * (1 + 1e-12) + 1e-12).all(), (norm_of(d, norm), e)
    assert (out >= 0).all() and (out <= 1).all()


@pytest.mark.parametrize("norm", NORMS)
def test_model_is_left_untouched(norm):
    model = tiny_cnn()
    model.train()
    model[0].eval()  # a mixed-mode model: every module's own mode must survive
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.123)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(6) % 4
    eps = 0.1 if norm == "linf" else 1.0
    apgd(model, x, y, eps=eps, steps=5, norm=norm, generator=torch.Generator().manual_seed(1))
    assert model.training and not model[0].training and model[1].training
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # includes BatchNorm running stats and num_batches_tracked
    for p in model.parameters():
        assert torch.equal(p.grad, torch.full_like(p, 0.123))


@pytest.mark.parametrize("norm", NORMS)
def test_same_generator_gives_the_same_output_and_inputs_are_not_mutated(norm):
    model = tiny_cnn().eval()
    x, y = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(4)
    x0, y0 = x.clone(), y.clone()
    eps = {"linf": 0.1, "l2": 0.5, "l1": 3.0}[norm]
    runs = [apgd(model, x, y, eps=eps, steps=5, norm=norm, generator=torch.Generator().manual_seed(s)) for s in (7, 7)]
    other = apgd(model, x, y, eps=eps, steps=5, norm=norm, generator=torch.Generator().manual_seed(8))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], other)
    assert torch.equal(x, x0) and torch.equal(y, y0)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("targeted", [False, True])
@given(seed=st.integers(0, 2**31 - 1), steps=st.integers(1, 8))
@settings(max_examples=30)
def test_the_attack_does_not_lower_the_loss(norm, targeted, seed, steps):
    # the start is an iterate and the best iterate is returned: never worse than the clean point
    model = Mlp(12, seed=seed % 5)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(5, 12, generator=g), torch.randint(0, 3, (5,), generator=g)
    eps = {"linf": 0.1, "l2": 0.5, "l1": 2.0}[norm]
    with torch.no_grad():
        clean = cross_entropy(model(x), y, reduction="none")
    out = apgd(model, x, y, eps=eps, steps=steps, norm=norm, targeted=targeted, random_start=False)
    with torch.no_grad():
        adv = cross_entropy(model(out), y, reduction="none")
    if targeted:
        assert (adv <= clean + 1e-6).all()
    else:
        assert (adv >= clean - 1e-6).all()


def test_apgd_raises_the_loss_of_a_conv_net_and_targeted_lowers_it():
    model = tiny_cnn().eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
    loss = lambda z: float(cross_entropy(model(z), y))  # noqa: E731
    with torch.no_grad():
        out = apgd(model, x, y, eps=8 / 255, steps=10, generator=g)
        tgt = apgd(model, x, y, eps=8 / 255, steps=10, targeted=True, generator=g)
        assert loss(out) > loss(x) > loss(tgt)


def test_works_under_no_grad_and_bf16_autocast():
    model = tiny_cnn().eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, 3, 8, 8, generator=g), torch.arange(4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = apgd(model, x, y, eps=4 / 255, steps=3, random_start=False)
    assert out.dtype == torch.float32
    assert (out - x).abs().max() <= 4 / 255 + 1e-7
    assert (out - x).abs().max() > 1 / 255  # it moved: the step is in float32, not lost to bf16 rounding


def test_soft_targets_match_hard_labels():
    model = tiny_cnn().eval()
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    hard = torch.tensor([0, 1, 2, 3])
    soft = nn.functional.one_hot(hard, 4).float()
    a = apgd(model, x, hard, eps=0.03, steps=4, generator=torch.Generator().manual_seed(1))
    b = apgd(model, x, soft, eps=0.03, steps=4, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(a, b)


def test_zero_steps_and_zero_eps():
    model = tiny_cnn().eval()
    x, y = torch.rand(2, 3, 8, 8), torch.arange(2)
    assert torch.equal(apgd(model, x, y, eps=0.1, steps=0, random_start=False), x)
    for norm in NORMS:
        assert torch.equal(apgd(model, x, y, eps=0.0, steps=3, norm=norm), x)
    assert apgd(model, x[:0], y[:0], eps=0.1, steps=3).shape == (0, 3, 8, 8)


@pytest.mark.parametrize("norm", NORMS)
def test_per_sample_eps_and_step_sizes_match_separate_calls(norm):
    # every decision (step size, restart, sparsity) is per sample: a batch is the same as its samples one by one
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 12, generator=g, dtype=torch.float64), torch.arange(3)
    eps = torch.tensor([0.0, 0.05, 0.2]) * _eps_norm_scale(norm, 12) ** 0.5
    out = apgd(model, x, y, eps=eps, steps=12, norm=norm, random_start=False)
    assert torch.equal(out[0], x[0])
    for i in range(3):
        one = apgd(model, x[i : i + 1], y[i : i + 1], eps=float(eps[i]), steps=12, norm=norm, random_start=False)
        torch.testing.assert_close(out[i : i + 1], one, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------- the algorithm


def _paper_checkpoints(steps: int) -> list[int]:
    """Naive reference: the p_j of the paper as exact fractions, w_j = ceil(p_j * steps), kept while < steps."""
    p = [Fraction(0), Fraction(22, 100)]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)))
    return sorted({math.ceil(q * steps) for q in p[1:] if math.ceil(q * steps) < steps})


def test_checkpoints_follow_the_paper():
    assert _checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]  # Croce & Hein 2020, Sec. 3.2
    assert _checkpoints(1) == [] and _checkpoints(2) == [1]
    for steps in range(0, 400):
        assert _checkpoints(steps) == _paper_checkpoints(steps), steps


def _naive_apgd(f, x, eps, steps, norm, *, rho=0.75, alpha=0.75, sparsity=0.2):
    """APGD as the papers write it, one sample at a time, with histories where apgd keeps counters."""
    out = []
    for b in range(x.shape[0]):
        lo, hi = -x[b : b + 1], 1 - x[b : b + 1]
        e = eps[b : b + 1]
        proj = lambda d: project_delta(d, lo, hi, e, norm)  # noqa: E731

        def value_and_grad(d):
            d = d.clone().requires_grad_(True)
            v = f(x[b : b + 1] + d)[0]
            return float(v.detach()), torch.autograd.grad(v, d)[0]

        xs = [torch.zeros_like(lo)]
        v, g = value_and_grad(xs[0])
        fs, gs, fmax, best = [v], [g], [v], 0  # fmax[i]: the best loss among x_0 .. x_i
        eta, halved = [2 * float(e)] if norm != "l1" else [float(e)], {0: False}
        checks = (
            _paper_checkpoints(steps)
            if norm != "l1"
            else list(range(max(int(0.04 * steps), 1), steps, max(int(0.04 * steps), 1)))
        )
        frac, nnz_old = sparsity, x.shape[1]
        for k in range(steps):
            d, g = xs[k], gs[k]
            if norm == "l1":
                free = [
                    i
                    for i in range(d.shape[1])
                    if not ((d[0, i] <= lo[0, i] and g[0, i] < 0) or (d[0, i] >= hi[0, i] and g[0, i] > 0))
                ]
                top = sorted(free, key=lambda i: -abs(float(g[0, i])))[: max(math.floor(frac * d.shape[1]), 1)]
                top = [i for i in top if g[0, i] != 0]
                step = torch.zeros_like(d)
                for i in top:
                    step[0, i] = torch.sign(g[0, i]) * eta[k] / len(top)
                new = proj(d + step)
            else:
                s = g.sign() if norm == "linf" else (g / g.abs().max()) / (g / g.abs().max()).norm()  # as pgd's
                z = proj(d + eta[k] * s)
                a = 1.0 if k == 0 else alpha
                new = proj(d + a * (z - d) + (1 - a) * (d - xs[k - 1]))
            v, g = value_and_grad(new)
            xs.append(new), fs.append(v), gs.append(g)
            best = k + 1 if v > fs[best] else best
            fmax.append(fs[best])
            eta.append(eta[k])
            if k + 1 not in checks:
                continue
            w = k + 1
            if norm == "l1":
                nnz = int((xs[best] != 0).sum())
                restart = nnz < 0.95 * nnz_old
                frac, nnz_old = nnz / x.shape[1] / 1.5, nnz
                eta[w] = min(max(float(e) if restart else eta[w] / 1.5, float(e) / 10), float(e))
            else:
                w_prev = max([c for c in checks if c < w], default=0)
                raised = sum(fs[i + 1] > fs[i] for i in range(w_prev, w))
                restart = raised < rho * (w - w_prev) or (not halved[w_prev] and fmax[w] <= fmax[w_prev])
                halved[w] = restart
                eta[w] = eta[w] / 2 if restart else eta[w]
            if restart:
                xs[w], fs[w], gs[w] = xs[best], fs[best], gs[best]
        out.append(xs[best])
    return x + torch.cat(out)


class Wavy(nn.Module):
    """A per-sample, per-coordinate landscape with many local maxima (no matmul: exactly batch-independent)."""

    def __init__(self, n: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a, self.c, self.v = torch.randn(3, n, generator=g, dtype=torch.float64) * torch.tensor([[20], [3], [1]])

    def forward(self, z):
        return (self.v * torch.sin(self.a * z.flatten(1) + self.c)).sum(1)


@pytest.mark.parametrize("norm", NORMS)
@given(seed=st.integers(0, 2**31 - 1), steps=st.integers(1, 40))
@settings(max_examples=10)
def test_matches_a_naive_per_sample_implementation(norm, seed, steps):
    g = torch.Generator().manual_seed(seed)
    n = 6
    x = torch.rand(4, n, generator=g, dtype=torch.float64)
    eps = torch.rand(4, generator=g, dtype=torch.float64) * {"linf": 0.3, "l2": 0.6, "l1": 1.0}[norm]
    model = Wavy(n, seed)
    out = apgd(model, x, None, eps=eps, steps=steps, norm=norm, loss_fn=identity_loss, random_start=False)
    ref = _naive_apgd(model, x, eps, steps, norm)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_two_steps_halve_and_restart_from_the_best_point(norm):
    # 1-D, loss -(z - 0.4)^2, eps 1, from 0 (loss -0.16). Step 1 (eta = 2 eps, no momentum) lands on 1 (loss
    # -0.36): it did not raise the loss, so the checkpoint at iterate 1 halves eta to 1 and restarts from the best
    # point 0 with its gradient; the previous iterate is still 0, so the momentum term is 0. Step 2: z = 1,
    # delta = 0 + 0.75 (1 - 0) = 0.75, loss -0.1225: the best iterate.
    x = torch.zeros(1, 1, dtype=torch.float64)
    loss = _concave(torch.tensor([[0.4]]))
    out = apgd(_identity, x, None, eps=1.0, steps=2, norm=norm, loss_fn=loss, random_start=False, bounds=(-5, 5))
    assert float(out) == 0.75
    # without the restart, step 2 goes back to 1 - 0.75 * 2 + 0.25 * 1 = -0.25 (loss -0.4225): the best stays 0
    plain = pgd(
        _identity,
        x,
        None,
        eps=1.0,
        step_size=2.0,
        steps=2,
        norm=norm,
        loss_fn=loss,
        random_start=False,
        bounds=(-5, 5),
        return_best=True,
    )
    assert float(plain) == 0.0


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_a_stalled_best_loss_halves_the_step_even_when_most_steps_go_up(norm):
    # Scripted losses (one per model call) with a tiny slope that sets the ascent direction. 20 steps: the first
    # checkpoint is iterate 5. Iterates 2..5 each raise the loss (4 of 5 steps >= rho), so condition 1 does not
    # fire, but the best loss (10, at the start) has not moved: condition 2 halves eta to 1 and restarts from 0,
    # whose ascent direction is +; iterate 6 is then 0 + 1 = 1, and its scripted loss makes it the best.
    # Without condition 2, iterate 6 would follow iterate 5's direction (-) from 1 with eta 2: -1.
    values = [10, 0, 1, 2, 3, 4, 100] + [-100] * 14
    slopes = [1, 1, 1, 1, 1, -1] + [1] * 15
    calls = []

    def scripted(out, y):
        t = len(calls)
        calls.append(t)
        return values[t] + 1e-6 * slopes[t] * out[:, 0]

    x = torch.zeros(1, 1, dtype=torch.float64)
    out = apgd(
        _identity,
        x,
        None,
        eps=1.0,
        steps=20,
        norm=norm,
        loss_fn=scripted,
        momentum=1.0,
        random_start=False,
        bounds=(-5, 5),
    )
    assert float(out) == 1.0
    assert len(calls) == 21  # one call per iterate: 20 with a gradient, the last without


@pytest.mark.parametrize("norm", ["linf", "l2"])
@given(seed=st.integers(0, 2**31 - 1))
@settings(max_examples=10)
def test_the_step_size_halves_onto_an_interior_maximum(norm, seed):
    # a fixed step of 2 eps keeps oscillating around an interior maximum; APGD's halving settles on it
    g = torch.Generator().manual_seed(seed)
    x = torch.full((2, 8), 0.5, dtype=torch.float64)
    eps = {"linf": 0.3, "l2": 0.6}[norm]
    c = x + (torch.rand(2, 8, generator=g, dtype=torch.float64) * 2 - 1) * 0.2 * eps  # well inside the ball
    out = apgd(_identity, x, None, eps=eps, steps=100, norm=norm, loss_fn=_concave(c), random_start=False)
    assert (out - c).abs().max() < {"linf": 0.03, "l2": 0.005}[norm] * eps
    fixed = pgd(
        _identity,
        x,
        None,
        eps=eps,
        step_size=2 * eps,
        steps=100,
        norm=norm,
        loss_fn=_concave(c),
        random_start=False,
        return_best=True,
    )
    assert (fixed - c).abs().max() > 0.1 * eps


def _linear_gap(norm: str, active_box: bool, seed: int) -> float:
    """Relative shortfall of apgd's value on a linear model from the closed-form optimum."""
    g = torch.Generator().manual_seed(seed)
    n = 10
    w = torch.randn(n, generator=g, dtype=torch.float64)
    eps = {"linf": 0.3, "l2": 0.8, "l1": 1.5}[norm]
    if active_box:
        x = torch.rand(1, n, generator=g, dtype=torch.float64)
        top = int(w.abs().argmax())  # the most valuable coordinate sits 0.01 from the face it is pushed towards
        x[0, top] = 0.99 if w[top] > 0 else 0.01
    else:
        x = torch.full((1, n), 0.5, dtype=torch.float64)
        eps = eps / 4 if norm != "l1" else 0.4  # the box never binds
    out = apgd(
        Linear(w),
        x,
        None,
        eps=eps,
        steps=100,
        norm=norm,
        loss_fn=identity_loss,
        generator=torch.Generator().manual_seed(seed),
    )
    ref = linear_optimum(w.numpy(), x[0].numpy(), eps, norm, 0.0, 1.0)
    value, best_value = float(w @ (out - x)[0]), float(w.numpy() @ ref)
    return (best_value - value) / abs(best_value)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("active_box", [False, True])
@given(seed=st.integers(0, 2**31 - 1))
@settings(max_examples=10)
def test_reaches_the_closed_form_optimum_on_a_linear_model(norm, active_box, seed):
    assert _linear_gap(norm, active_box, seed) <= 1e-6


@pytest.mark.parametrize("active_box", [False, True])
def test_l1_apgd_comes_close_to_the_linear_optimum_on_most_problems(active_box):
    # l1-APGD's equal-weight sparse steps and its step-size floor of eps / 10 make it a heuristic with a heavy
    # tail: over 1,200 random seeds with the box active the relative gap was median 0.07%, p95 1.6%, p99 5.0%,
    # worst 20.4% (measured 2026-11-24). So the claim is about the distribution over a fixed set of problems.
    gaps = np.array([_linear_gap("l1", active_box, seed) for seed in range(100)])
    print(
        f"\nl1-APGD gap to the linear optimum (box {'active' if active_box else 'inactive'}, 100 seeds): "
        f"median {np.median(gaps):.5f}, p95 {np.quantile(gaps, 0.95):.4f}, max {gaps.max():.4f}"
    )
    assert (gaps >= -1e-9).all()  # never above the optimum: the closed form is right and the output feasible
    assert np.median(gaps) <= 0.005 and np.quantile(gaps, 0.95) <= 0.03


# ---------------------------------------------------------------------------------------------- bad input

GOOD = dict(eps=0.1, steps=2)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda x, y, kw: (x.clone().index_fill_(0, torch.tensor([0]), float("nan")), y, kw), ValueError, "NaN"),
        (lambda x, y, kw: (x + 1.5, y, kw), ValueError, "inside bounds"),
        (lambda x, y, kw: (x, y, {**kw, "eps": -0.1}), ValueError, "eps"),
        (lambda x, y, kw: (x, y, {**kw, "eps": float("inf")}), ValueError, "eps"),
        (lambda x, y, kw: (x, y, {**kw, "eps": torch.full((3,), 0.1)}), ValueError, "shape"),
        (lambda x, y, kw: (x, y, {**kw, "steps": -1}), ValueError, "steps"),
        (lambda x, y, kw: (x, y, {**kw, "steps": 2.5}), TypeError, "steps"),
        (lambda x, y, kw: (x, y, {**kw, "norm": "l3"}), ValueError, "unknown norm"),
        (lambda x, y, kw: (x, y, {**kw, "rho": 0.0}), ValueError, "rho"),
        (lambda x, y, kw: (x, y, {**kw, "rho": 1.5}), ValueError, "rho"),
        (lambda x, y, kw: (x, y, {**kw, "momentum": 0.0}), ValueError, "momentum"),
        (lambda x, y, kw: (x, y, {**kw, "momentum": "0.75"}), TypeError, "momentum"),
        (lambda x, y, kw: (x, y, {**kw, "l1_sparsity": 0.0}), ValueError, "l1_sparsity"),
        (lambda x, y, kw: (x, y, {**kw, "l1_sparsity": 2.0}), ValueError, "l1_sparsity"),
        (lambda x, y, kw: (x, y[:3], kw), ValueError, "batch size"),
        (lambda x, y, kw: (x, [0, 1, 2, 3], kw), TypeError, "default loss"),
        (lambda x, y, kw: ((x * 255).to(torch.uint8), y, kw), TypeError, "floating"),
        (lambda x, y, kw: (x, y, {**kw, "bounds": (1.0, 0.0)}), ValueError, "bounds"),
        (lambda x, y, kw: (x.flatten(), y, kw), ValueError, "batched"),
        (lambda x, y, kw: (x.numpy(), y, kw), TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_raises_a_named_error_before_any_work(change, error, match):
    calls = []

    class Spy(nn.Module):
        def forward(self, x):
            calls.append(1)
            return x.flatten(1)[:, :4].float()

    xb, yb, kw = change(torch.rand(4, 3, 4, 4), torch.arange(4), dict(GOOD))
    with pytest.raises(error, match=match):
        apgd(Spy(), xb, yb, **kw)
    assert not calls  # nothing half-done: the model never ran


def test_a_scalar_loss_is_refused():
    model = tiny_cnn().eval()
    with pytest.raises(ValueError, match="per-sample"):
        apgd(model, torch.rand(2, 3, 8, 8), torch.arange(2), eps=0.1, steps=2, loss_fn=lambda o, y: o.sum())


def test_inference_mode_is_refused_with_a_clear_error():
    model = tiny_cnn().eval()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        apgd(model, torch.rand(2, 3, 8, 8), torch.arange(2), **GOOD)


# ---------------------------------------------------------------------------------------------- vs AutoAttack


@pytest.mark.slow
def test_apgd_ce_is_no_weaker_than_autoattacks(shared_datasets):
    from pyautoattack.autopgd_base import APGDAttack

    from advtrain.eval import evaluate
    from tests.helpers_mnist import trained_mnist_cnn

    model, x, y = trained_mnist_cnn(str(shared_datasets / "mnist"))
    loader = [(x[i : i + 500], y[i : i + 500]) for i in range(0, x.shape[0], 500)]
    steps = 20
    lines = []
    for norm, ref_norm, eps in [("linf", "Linf", 0.1), ("l2", "L2", 1.5), ("l1", "L1", 10.0)]:

        def ours(m, xb, yb, norm=norm, eps=eps):
            return apgd(m, xb, yb, eps=eps, steps=steps, norm=norm, generator=torch.Generator().manual_seed(0))

        def reference(m, xb, yb, ref_norm=ref_norm, eps=eps):
            attack = APGDAttack(m, n_iter=steps, norm=ref_norm, n_restarts=1, eps=eps, seed=0, loss="ce", device="cpu")
            return attack.perturb(xb, yb)

        r = evaluate(model, loader, attacks={"advtrain": ours, "autoattack": reference}, progress=False)
        lines.append(
            f"MNIST {x.shape[0]}, {norm} eps {eps}, APGD-CE {steps} steps, 1 restart: clean {r.clean:.3f}, "
            f"advtrain {r.robust['advtrain']:.3f}, pyautoattack {r.robust['autoattack']:.3f}"
        )
        assert r.clean > 0.95  # the model is trained: the comparison means something
        assert r.robust["advtrain"] < r.clean - 0.2  # and the attack bites
        assert r.robust["advtrain"] <= r.robust["autoattack"] + 0.01
    print("\n" + "\n".join(lines))
