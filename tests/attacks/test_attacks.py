"""The attack contract and invariants, for every attack and norm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from advtrain import cross_entropy, fgsm, pgd
from advtrain.attacks._projections import norm_of
from tests.helpers import Linear, identity_loss, linear_optimum, tiny_cnn

NORMS = ["linf", "l2", "l1"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _pgd(model, x, y, *, eps, norm, generator=None, **kw):
    return pgd(
        model,
        x,
        y,
        eps=eps,
        step_size=kw.pop("step_size", 0.3),
        steps=kw.pop("steps", 3),
        norm=norm,
        generator=generator,
        **kw,
    )


def _fgsm(model, x, y, *, eps, norm, generator=None, **kw):
    kw.pop("steps", None)
    return fgsm(
        model,
        x,
        y,
        eps=eps,
        norm=norm,
        generator=generator,
        random_start=True,
        step_size=kw.pop("step_size", 0.3),
        **kw,
    )


ATTACKS = {"pgd": _pgd, "fgsm": _fgsm}


class Mlp(nn.Module):
    """Any input shape, any float dtype: flattens, computes in float32."""

    def __init__(self, n: int, classes: int = 3, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1 = nn.Linear(n, 8)
        self.l2 = nn.Linear(8, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x.flatten(1).float())))


def _eps_norm_scale(norm: str, n: int) -> float:
    # radii that matter at each norm: a few pixels' worth for l2, many for l1
    return {"linf": 1.0, "l2": n**0.5, "l1": float(n)}[norm]


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("norm", NORMS)
@given(
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from(DTYPES),
    shape=st.sampled_from([(1, 3), (2, 1, 4, 4), (3, 3, 2, 5), (4, 12), (2, 2, 3, 3)]),
    eps_frac=st.floats(0.0, 0.6),
    per_sample=st.booleans(),
    pin=st.floats(0.0, 0.5),
    best=st.booleans(),
)
def test_no_output_leaves_the_ball_or_the_box(attack, norm, seed, dtype, shape, eps_frac, per_sample, pin, best):
    g = torch.Generator().manual_seed(seed)
    n = int(np.prod(shape[1:]))
    x = torch.rand(shape, generator=g)
    u = torch.rand(shape, generator=g)
    x = torch.where(u < pin / 2, 0.0, torch.where(u > 1 - pin / 2, 1.0, x)).to(dtype)  # pixels on the box faces
    y = torch.randint(0, 3, (shape[0],), generator=g)
    scale = _eps_norm_scale(norm, n)
    eps = torch.rand(shape[0], generator=g, dtype=torch.float64) * eps_frac * scale if per_sample else eps_frac * scale
    kw = {"return_best": best} if attack == "pgd" else {}
    out = ATTACKS[attack](
        Mlp(n, seed=seed % 7),
        x,
        y,
        eps=eps,
        norm=norm,
        step_size=0.5 * scale * 0.3 + 1e-3,
        generator=torch.Generator().manual_seed(seed),
        l1_sparsity=0.2,
        **kw,
    )
    assert out.shape == x.shape and out.dtype == x.dtype and not out.requires_grad
    d = (out.double() - x.double()).flatten(1)
    e = eps if isinstance(eps, torch.Tensor) else torch.full((shape[0],), float(eps), dtype=torch.float64)
    assert (norm_of(d, norm) <= e * (1 + 1e-12) + 1e-12).all(), (norm_of(d, norm), e)
    assert (out >= 0).all() and (out <= 1).all()


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("active_box", [False, True])
@given(seed=st.integers(0, 2**31 - 1))
@settings(max_examples=25)
def test_reaches_the_closed_form_optimum_on_a_linear_model(norm, active_box, seed):
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
    step = eps / 4
    model = Linear(w)
    # l1: one coordinate per step (the top-1 step reaches the knapsack optimum; wider steps spread mass)
    out = pgd(
        model,
        x,
        None,
        eps=eps,
        step_size=step,
        steps=200,
        norm=norm,
        loss_fn=identity_loss,
        random_start=False,
        return_best=True,
        l1_sparsity=1e-9,
    )
    d = (out - x)[0].numpy()
    ref = linear_optimum(w.numpy(), x[0].numpy(), eps, norm, 0.0, 1.0)
    value, best_value = float(w.numpy() @ d), float(w.numpy() @ ref)
    assert value >= best_value - 1e-6 * max(1.0, abs(best_value))
    if active_box:
        assert ((x[0].numpy() + ref <= 1e-12) | (x[0].numpy() + ref >= 1 - 1e-12)).any()  # the box binds
    np.testing.assert_allclose(d, ref, atol=1e-5)


@pytest.mark.parametrize("norm", NORMS)
def test_fgsm_without_random_start_is_one_steepest_step(norm):
    w = torch.tensor([3.0, -1.0, 0.5, -2.0], dtype=torch.float64)
    x = torch.full((1, 4), 0.5, dtype=torch.float64)
    eps = 0.2
    out = fgsm(Linear(w), x, None, eps=eps, norm=norm, loss_fn=identity_loss, l1_sparsity=1e-9)
    ref = linear_optimum(w.numpy(), x[0].numpy(), eps, norm, 0.0, 1.0)
    np.testing.assert_allclose((out - x)[0].numpy(), ref, atol=1e-12)


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("norm", NORMS)
def test_model_is_left_untouched(attack, norm):
    model = tiny_cnn()
    model.train()
    model[0].eval()  # a mixed-mode model: every module's own mode must survive
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.123)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(6) % 4
    ATTACKS[attack](
        model, x, y, eps=0.1 if norm == "linf" else 1.0, norm=norm, generator=torch.Generator().manual_seed(1)
    )
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
    x0 = x.clone()
    runs = [
        pgd(model, x, y, eps=0.5, step_size=0.1, steps=3, norm=norm, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    other = pgd(model, x, y, eps=0.5, step_size=0.1, steps=3, norm=norm, generator=torch.Generator().manual_seed(8))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], other)
    assert torch.equal(x, x0)


@pytest.mark.parametrize("norm", NORMS)
@given(seed=st.integers(0, 2**31 - 1))
@settings(max_examples=30)
def test_the_attack_does_not_lower_the_loss(norm, seed):
    model = Mlp(12, seed=seed % 5)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(5, 12, generator=g), torch.randint(0, 3, (5,), generator=g)
    eps = {"linf": 0.1, "l2": 0.5, "l1": 2.0}[norm]
    with torch.no_grad():
        clean = cross_entropy(model(x), y, reduction="none")
    out = pgd(model, x, y, eps=eps, step_size=eps / 4, steps=5, norm=norm, random_start=False, return_best=True)
    with torch.no_grad():
        adv = cross_entropy(model(out), y, reduction="none")
    assert (adv >= clean - 1e-6).all()


def test_pgd_raises_the_loss_of_a_conv_net_and_targeted_lowers_it():
    model = tiny_cnn().eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
    loss = lambda z: float(cross_entropy(model(z), y))  # noqa: E731
    with torch.no_grad():
        out = pgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=10, generator=g)
        tgt = pgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=10, targeted=True, generator=g)
        assert loss(out) > loss(x) > loss(tgt)


def test_soft_targets_and_a_custom_loss():
    model = tiny_cnn().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8, generator=g)
    hard = torch.tensor([0, 1, 2, 3])
    soft = torch.nn.functional.one_hot(hard, 4).float()
    a = pgd(model, x, hard, eps=0.03, step_size=0.01, steps=3, generator=torch.Generator().manual_seed(1))
    b = pgd(model, x, soft, eps=0.03, step_size=0.01, steps=3, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(a, b)
    margin = lambda out, y: -out.gather(1, y[:, None]).squeeze(1)  # noqa: E731
    c = pgd(
        model, x, hard, eps=0.03, step_size=0.01, steps=3, loss_fn=margin, generator=torch.Generator().manual_seed(1)
    )
    assert c.shape == x.shape


def test_works_under_no_grad_and_bf16_autocast():
    model = tiny_cnn().eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, 3, 8, 8, generator=g), torch.arange(4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = pgd(model, x, y, eps=4 / 255, step_size=1 / 255, steps=3, generator=g)
    assert out.dtype == torch.float32
    assert (out - x).abs().max() <= 4 / 255 + 1e-7
    assert (out - x).abs().max() > 1 / 255  # it moved: the step is in float32, not lost to bf16 rounding


@pytest.mark.slow
def test_works_on_a_compiled_model():
    model = tiny_cnn(bn=False).eval()
    compiled = torch.compile(model)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, 3, 8, 8, generator=g), torch.arange(4)
    eager = pgd(model, x, y, eps=4 / 255, step_size=1 / 255, steps=2, generator=torch.Generator().manual_seed(1))
    comp = pgd(compiled, x, y, eps=4 / 255, step_size=1 / 255, steps=2, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(eager, comp, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_zero_steps_and_zero_eps():
    model = tiny_cnn().eval()
    x, y = torch.rand(2, 3, 8, 8), torch.arange(2)
    assert torch.equal(pgd(model, x, y, eps=0.1, step_size=0.1, steps=0, random_start=False), x)
    for norm in NORMS:
        assert torch.equal(pgd(model, x, y, eps=0.0, step_size=0.1, steps=2, norm=norm), x)


def test_per_sample_eps_matches_separate_calls():
    model = tiny_cnn(bn=False).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 3, 8, 8, generator=g), torch.arange(3)
    eps = torch.tensor([0.0, 2 / 255, 8 / 255])
    out = pgd(model, x, y, eps=eps, step_size=1 / 255, steps=4, random_start=False)
    for i in range(3):
        one = pgd(model, x[i : i + 1], y[i : i + 1], eps=float(eps[i]), step_size=1 / 255, steps=4, random_start=False)
        assert torch.allclose(out[i : i + 1], one, atol=1e-7)


# ---------------------------------------------------------------------------------------------- bad input

GOOD = dict(eps=0.1, step_size=0.01, steps=2)


BAD_INPUTS = [
    (lambda x, y, kw: (x.clone().index_fill_(0, torch.tensor([0]), float("nan")), y, kw), ValueError, "NaN"),
    (lambda x, y, kw: (x.clone().index_fill_(0, torch.tensor([0]), float("inf")), y, kw), ValueError, "NaN or inf"),
    (lambda x, y, kw: (x + 1.5, y, kw), ValueError, "inside bounds"),
    (lambda x, y, kw: (x - 0.5, y, kw), ValueError, "inside bounds"),
    (lambda x, y, kw: (x, y, {**kw, "eps": -0.1}), ValueError, "eps"),
    (lambda x, y, kw: (x, y, {**kw, "eps": float("nan")}), ValueError, "eps"),
    (lambda x, y, kw: (x, y, {**kw, "step_size": 0.0}), ValueError, "step_size"),
    (lambda x, y, kw: (x, y, {**kw, "step_size": -1.0}), ValueError, "step_size"),
    (lambda x, y, kw: (x, y, {**kw, "steps": -1}), ValueError, "steps"),
    (lambda x, y, kw: (x, y, {**kw, "steps": 2.5}), TypeError, "steps"),
    (lambda x, y, kw: (x, y, {**kw, "norm": "l3"}), ValueError, "unknown norm"),
    (lambda x, y, kw: (x, y[:3], kw), ValueError, "batch size"),
    (lambda x, y, kw: ((x * 255).to(torch.uint8), y, kw), TypeError, "floating"),
    (lambda x, y, kw: (x, y, {**kw, "eps": torch.full((3,), 0.1)}), ValueError, "shape"),
    (lambda x, y, kw: (x, y, {**kw, "eps": torch.full((4, 1), 0.1)}), ValueError, "shape"),
    (lambda x, y, kw: (x, y, {**kw, "bounds": (1.0, 0.0)}), ValueError, "bounds"),
    (lambda x, y, kw: (x.flatten(), y, kw), ValueError, "batched"),
    (lambda x, y, kw: (x.numpy(), y, kw), TypeError, "torch.Tensor"),
    (lambda x, y, kw: (x, y, {**kw, "l1_sparsity": 0.0}), ValueError, "l1_sparsity"),
]


@pytest.mark.parametrize(
    "attack, change, error, match",
    [("pgd", *case) for case in BAD_INPUTS] + [("fgsm", *case) for case in BAD_INPUTS if case[2] != "steps"],
)
def test_bad_input_raises_a_named_error_before_any_work(change, error, match, attack):
    calls = []

    class Spy(nn.Module):
        def forward(self, x):
            calls.append(1)
            return x.flatten(1)[:, :4].float()

    x, y = torch.rand(4, 3, 4, 4), torch.arange(4)
    xb, yb, kw = change(x, y, dict(GOOD))
    if attack == "fgsm":
        kw.pop("steps")  # one step by definition
    fn = pgd if attack == "pgd" else fgsm
    with pytest.raises(error, match=match):
        fn(Spy(), xb, yb, **kw)
    assert not calls  # nothing half-done: the model never ran


def test_inference_mode_is_refused_with_a_clear_error():
    model = tiny_cnn().eval()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        pgd(model, torch.rand(2, 3, 8, 8), torch.arange(2), **GOOD)
