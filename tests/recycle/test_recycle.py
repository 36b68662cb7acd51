"""Gradient recycling: equal to a naive two-pass computation in float64; re-weighting and update-speed arithmetic."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from advtrain import cross_entropy
from advtrain.bn import bn_route, convert_split_bn_, split_parameters
from advtrain.recycle import maybe_no_sync, recycled_step, scale_grads_, sync_update_speed_
from tests.helpers import tiny_cnn


def _model(seed: int) -> nn.Module:
    return convert_split_bn_(tiny_cnn(seed=seed)).double()


def _route(model, route):
    return bn_route(model, split=route) if isinstance(route, tuple) else bn_route(model, route)


@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(2, 6),
    beta=st.floats(0.01, 4.0),
    train=st.booleans(),
    route=st.sampled_from(["clean", "adv", "split"]),
)
@settings(max_examples=40)
def test_recycled_gradients_equal_a_naive_two_pass_computation_in_float64(seed, batch, beta, train, route):
    g = torch.Generator().manual_seed(seed)
    model = _model(seed % 3).train(train)
    naive_model = copy.deepcopy(model)
    x = torch.rand(batch, 3, 8, 8, generator=g, dtype=torch.float64)
    delta = (torch.rand(x.shape, generator=g, dtype=torch.float64) * 2 - 1) * 0.03
    y = torch.randint(0, 4, (batch,), generator=g)
    route = (batch // 2, batch - batch // 2) if route == "split" else route
    old = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in model.parameters()]
    for p, o in zip(model.parameters(), old):
        p.grad = o.clone()  # recycling accumulates into what is there

    with _route(model, route):
        step = recycled_step(model, x, y, delta, beta=beta)

    # naive: one pass for the weights, another for the input, each with torch.autograd.grad
    params = list(naive_model.parameters())
    with _route(naive_model, route):
        loss = cross_entropy(naive_model(x + delta), y, reduction="none")
        weight_grads = torch.autograd.grad(loss.sum(), params, allow_unused=True)
        d = delta.clone().requires_grad_(True)
        (input_grad,) = torch.autograd.grad(cross_entropy(naive_model(x + d), y, reduction="none").sum(), d)

    torch.testing.assert_close(step.grad, input_grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(step.loss, loss.detach(), rtol=1e-12, atol=1e-12)
    for p, o, w in zip(model.parameters(), old, weight_grads):
        expected = o if w is None else o + beta * w
        torch.testing.assert_close(p.grad, expected, rtol=1e-12, atol=1e-12)
    assert not step.grad.requires_grad and not step.output.requires_grad
    assert int((step.grad != 0).sum()) > 0


def test_the_recycled_input_gradient_makes_the_fast_advprop_pgd1_step():
    # on a linear model the l_inf step from the recycled gradient is the closed-form optimum sign(w_wrong - w_right)
    model = nn.Linear(4, 2, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 0.0], [-1.0, 1.0, 1.5, 2.0]], dtype=torch.float64))
    x, y = torch.full((1, 4), 0.5, dtype=torch.float64), torch.tensor([0])
    step = recycled_step(model, x, y, torch.zeros_like(x), beta=0.5)
    expected = torch.sign(model.weight[1] - model.weight[0]).detach()
    assert torch.equal(step.grad.sign()[0], expected)
    torch.testing.assert_close(
        model.weight.grad,
        0.5 * torch.outer(torch.softmax(model(x), 1)[0] - torch.tensor([1.0, 0.0], dtype=torch.float64), x[0]).detach(),
    )


def test_a_frozen_parameter_and_an_unused_one_get_no_gradient():
    model = _model(0).eval()
    model[0].weight.requires_grad_(False)
    x, y = torch.rand(2, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1])
    with bn_route(model, "adv"):
        recycled_step(model, x, y, torch.zeros_like(x), beta=0.5)
    assert model[0].weight.grad is None
    assert model[1].weight.grad is None  # the main BN is not on the adversarial route
    assert model[1].aux.weight.grad is not None


def test_a_custom_loss_returning_a_scalar_is_the_total():
    model = _model(1).eval()
    x, y = torch.rand(3, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2])
    a = recycled_step(
        model, x, y, torch.zeros_like(x), beta=1.0, loss_fn=lambda o, t: cross_entropy(o, t, reduction="sum")
    )
    grads_a = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    b = recycled_step(model, x, y, torch.zeros_like(x), beta=1.0)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-14)
    assert a.loss.ndim == 0 and b.loss.shape == (3,)
    for ga, p in zip(grads_a, model.parameters()):
        assert (ga is None) == (p.grad is None)
        if ga is not None:
            torch.testing.assert_close(ga, p.grad, rtol=0, atol=1e-14)


def test_recycled_step_bad_input():
    model = _model(0)
    x, y = torch.rand(2, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"delta must have x's shape \(2, 3, 8, 8\); got \(2, 3, 8\)"):
        recycled_step(model, x, y, torch.zeros(2, 3, 8, dtype=torch.float64), beta=0.5)
    with pytest.raises(ValueError, match="beta must be > 0"):
        recycled_step(model, x, y, torch.zeros_like(x), beta=0.0)
    with pytest.raises(ValueError, match="beta must be finite and >= 0"):
        recycled_step(model, x, y, torch.zeros_like(x), beta=float("inf"))
    with pytest.raises(TypeError, match="beta must be a number"):
        recycled_step(model, x, y, torch.zeros_like(x), beta="0.5")
    with pytest.raises(TypeError, match="x must be floating"):
        recycled_step(model, x.long(), y, torch.zeros_like(x), beta=0.5)
    with pytest.raises(ValueError, match=r"per-sample losses or a scalar; got shape \(2, 4\)"):
        recycled_step(model, x, y, torch.zeros_like(x), beta=0.5, loss_fn=lambda o, t: o)
    with torch.no_grad(), pytest.raises(RuntimeError, match="no_grad"):
        recycled_step(model, x, y, torch.zeros_like(x), beta=0.5)
    assert all(p.grad is None for p in model.parameters())  # nothing half-done


# ------------------------------------------------------------------------------------------ re-weighting


def test_scale_grads_multiplies_and_skips_missing_gradients():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    a.grad = torch.tensor([1.0, -4.0])
    scale_grads_([a, b], 0.25)
    assert a.grad.tolist() == [0.25, -1.0] and b.grad is None
    module = nn.Linear(2, 1)
    module.weight.grad = torch.full((1, 2), 3.0)
    scale_grads_(module, 2.0)
    assert module.weight.grad.tolist() == [[6.0, 6.0]] and module.bias.grad is None
    with pytest.raises(ValueError, match="factor must be finite and >= 0; got -1"):
        scale_grads_([a], -1.0)
    with pytest.raises(TypeError, match="not a single tensor"):
        scale_grads_(a, 2.0)


# ------------------------------------------------------------------------------- update-speed synchronization


def test_sync_update_speed_divides_each_group_by_its_weighted_count():
    # 6 clean (weight 1), 4 noisy recycled with beta = 0.5, 4 adversarial with weight 0.5:
    # N_c = 6, N_a = 0.5 * 4 + 0.5 * 4 = 4, shared count 10
    model = _model(0)
    groups = split_parameters(model)
    for p in model.parameters():
        p.grad = torch.full_like(p, 60.0)
    counts = sync_update_speed_(model, n_clean=6 * 1.0, n_aux=4 * 0.5 + 4 * 0.5)
    assert counts == (10.0, 6.0, 4.0)
    assert all(torch.all(p.grad == 6.0) for p in groups.shared)
    assert all(torch.all(p.grad == 10.0) for p in groups.clean)
    assert all(torch.all(p.grad == 15.0) for p in groups.aux)


def test_a_group_that_saw_no_sample_is_left_alone():
    model = _model(0)
    for p in model.parameters():
        p.grad = torch.full_like(p, 8.0)
    counts = sync_update_speed_(model, n_clean=4, n_aux=0)
    assert counts == (4.0, 4.0, 0.0)
    assert torch.all(model[1].aux.weight.grad == 8.0) and torch.all(model[1].weight.grad == 2.0)
    with pytest.raises(ValueError, match="n_aux must be finite and >= 0; got -1"):
        sync_update_speed_(model, n_clean=4, n_aux=-1)


def test_a_fast_advprop_step_averages_every_parameter_over_the_samples_that_reached_it():
    # the arithmetic end to end: clean pass (weight w_c), recycled noisy pass (beta), adversarial pass (w_a), then
    # sync_update_speed_; against per-sample gradients averaged by hand, in float64
    g = torch.Generator().manual_seed(0)
    model = _model(2).eval()  # eval: per-sample gradients are independent of the batch
    w_c, beta, w_a = 1.0, 0.5, 0.7
    xc, yc = torch.rand(3, 3, 8, 8, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2])
    xa, ya = torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64), torch.tensor([3, 1])
    noise = (torch.rand(xa.shape, generator=g, dtype=torch.float64) * 2 - 1) * 0.03
    reference = copy.deepcopy(model)

    with bn_route(model, "clean"):
        (w_c * cross_entropy(model(xc), yc, reduction="sum")).backward()
    with bn_route(model, "adv"):
        step = recycled_step(model, xa, ya, noise, beta=beta)
        x_adv = xa + (noise + 0.03 * step.grad.sign()).clamp(-0.03, 0.03)
        (w_a * cross_entropy(model(x_adv), ya, reduction="sum")).backward()
    sync_update_speed_(model, n_clean=w_c * 3, n_aux=beta * 2 + w_a * 2)

    def per_sample(route, xs, ys):
        out = []
        for i in range(xs.shape[0]):
            with bn_route(reference, route):
                loss = cross_entropy(reference(xs[i : i + 1]), ys[i : i + 1], reduction="sum")
            out.append(torch.autograd.grad(loss, list(reference.parameters()), allow_unused=True))
        return out

    contributions = (
        [(w_c, gr) for gr in per_sample("clean", xc, yc)]
        + [(beta, gr) for gr in per_sample("adv", xa + noise, ya)]
        + [(w_a, gr) for gr in per_sample("adv", x_adv, ya)]
    )
    groups = split_parameters(reference)
    kind = {id(p): k for k, group in zip(("shared", "clean", "aux"), groups) for p in group}
    counts = {"shared": w_c * 3 + beta * 2 + w_a * 2, "clean": w_c * 3, "aux": beta * 2 + w_a * 2}
    for j, (p, q) in enumerate(zip(model.parameters(), reference.parameters())):
        total = sum(w * gr[j] for w, gr in contributions if gr[j] is not None)
        torch.testing.assert_close(p.grad, total / counts[kind[id(q)]], rtol=1e-12, atol=1e-12)


def test_maybe_no_sync_is_a_no_op_without_ddp():
    model = nn.Linear(2, 1)
    with maybe_no_sync(model, enabled=True):
        model(torch.ones(1, 2)).sum().backward()
    with maybe_no_sync(model, enabled=False):
        model(torch.ones(1, 2)).sum().backward()
    assert model.bias.grad.item() == 2.0
