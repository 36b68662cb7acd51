"""Every attack under NaN/inf model outputs and gradients, and its checks of outputs, labels and eps (issue 17)."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from advtrain.attacks import NonFiniteWarning, apgd, fgsm, pgd
from advtrain.attacks._projections import norm_of
from tests.attacks.test_attacks import Mlp, _eps_norm_scale
from tests.helpers import tiny_cnn

NORMS = ["linf", "l2", "l1"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
POISON = (float("nan"), float("inf"))  # each makes the cross-entropy of its row non-finite


def _run(attack: str, model, x, y, *, eps, norm, steps, option: bool, targeted: bool, seed: int, **kw):
    """Each attack with one boolean ``option``: pgd's random_start and return_best, fgsm's and apgd's random_start.

    ``option=False`` starts every attack at ``x``."""
    g = torch.Generator().manual_seed(seed)
    scale = _eps_norm_scale(norm, x[0].numel())
    match attack:
        case "pgd":
            return pgd(
                model,
                x,
                y,
                eps=eps,
                step_size=0.15 * scale + 1e-3,
                steps=steps,
                norm=norm,
                return_best=option,
                random_start=option,
                targeted=targeted,
                l1_sparsity=0.2,
                generator=g,
                **kw,
            )
        case "fgsm":
            return fgsm(
                model,
                x,
                y,
                eps=eps,
                step_size=0.15 * scale + 1e-3,
                norm=norm,
                random_start=option,
                targeted=targeted,
                l1_sparsity=0.2,
                generator=g,
                **kw,
            )
        case "apgd":
            return apgd(
                model,
                x,
                y,
                eps=eps,
                steps=steps,
                norm=norm,
                random_start=option,
                targeted=targeted,
                l1_sparsity=0.2,
                generator=g,
                **kw,
            )
    raise ValueError(attack)


class _PoisonGrad(torch.autograd.Function):
    """Identity forward; the backward writes NaN/inf into the gradient where ``mask`` is set."""

    @staticmethod
    def forward(ctx, x, mask, value):
        ctx.save_for_backward(mask)
        ctx.value = value
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        return torch.where(mask, ctx.value, g), None, None


class Poisoned(nn.Module):
    """``inner``'s logits, with NaN or +inf at random places: in the output (``where="output"``) or in the input
    gradient alone, the loss staying finite (``where="grad"``). Each forward draws its own places from a seeded
    generator (rows with probability ``p``); ``hit`` records every row ever poisoned."""

    def __init__(self, inner: nn.Module, batch: int, *, p: float, where: str, seed: int):
        super().__init__()
        self.inner, self.p, self.where = inner, p, where
        self.g = torch.Generator().manual_seed(seed)
        self.hit = torch.zeros(batch, dtype=torch.bool)

    def forward(self, x):
        b = x.shape[0]
        rows = torch.rand(b, generator=self.g) < self.p
        value = POISON[int(torch.randint(0, 2, (), generator=self.g))]
        if self.where == "grad":
            if not torch.is_grad_enabled():  # a no-grad forward has no gradient to poison
                return self.inner(x)
            places = rows[:, None] & (torch.rand(b, x[0].numel(), generator=self.g) < 0.5)
            places[rows, 0] = True  # at least one coordinate of each poisoned row
            x = _PoisonGrad.apply(x, places.view_as(x), value)
            out = self.inner(x)
        else:
            out = self.inner(x)
            places = rows[:, None] & (torch.rand(out.shape, generator=self.g) < 0.5)
            places[rows, 0] = True
            out = torch.where(places, value, out)
        self.hit |= rows
        return out


def _nonfinite_count(caught) -> int:
    msgs = [str(w.message) for w in caught if issubclass(w.category, NonFiniteWarning)]
    assert len(msgs) <= 1, msgs  # one warning per call
    return int(re.search(r": (\d+) of \d+ samples", msgs[0]).group(1)) if msgs else 0


@pytest.mark.parametrize("attack", ["pgd", "fgsm", "apgd"])
@pytest.mark.parametrize("norm", NORMS)
@given(
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from(DTYPES),
    shape=st.sampled_from([(1, 3), (2, 1, 4, 4), (3, 3, 2, 5), (5, 12)]),
    eps_frac=st.floats(0.0, 0.6),
    p=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
    where=st.sampled_from(["output", "grad"]),
    steps=st.integers(1, 4),
    option=st.booleans(),
    targeted=st.booleans(),
)
@settings(max_examples=50)
def test_nan_and_inf_never_leave_the_ball_or_the_box(
    attack, norm, seed, dtype, shape, eps_frac, p, where, steps, option, targeted
):
    g = torch.Generator().manual_seed(seed)
    n = int(np.prod(shape[1:]))
    x = torch.rand(shape, generator=g).to(dtype)
    y = torch.randint(0, 3, (shape[0],), generator=g)
    eps = eps_frac * _eps_norm_scale(norm, n)
    inner = Mlp(n, seed=seed % 7)
    for q in inner.parameters():
        q.grad = torch.full_like(q, 0.25)
    before = {k: v.clone() for k, v in inner.state_dict().items()}
    model = Poisoned(inner, shape[0], p=p, where=where, seed=seed)
    kw = dict(eps=eps, norm=norm, steps=steps, option=option, targeted=targeted, seed=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _run(attack, model, x, y, **kw)
    clean = _run(attack, inner, x, y, **kw)

    assert out.shape == x.shape and out.dtype == x.dtype and not out.requires_grad
    assert torch.isfinite(out).all()
    d = (out.double() - x.double()).flatten(1)
    assert (norm_of(d, norm) <= eps * (1 + 1e-12) + 1e-12).all(), (norm_of(d, norm), eps)
    assert (out >= 0).all() and (out <= 1).all()
    # per sample: the samples never poisoned get exactly the attack on the clean model (Mlp mixes no samples) ...
    assert torch.equal(out[~model.hit], clean[~model.hit])
    # ... and the warning counts exactly the poisoned ones (NaN and +inf both make a row's loss or gradient bad)
    assert _nonfinite_count(caught) == int(model.hit.sum())
    # the model is left as found
    assert all(torch.equal(v, before[k]) for k, v in inner.state_dict().items())
    assert all(torch.equal(q.grad, torch.full_like(q, 0.25)) for q in inner.parameters())


class _HalfLogits(nn.Module):
    """fp16 logits, with row 0 scaled past fp16's range (65504): that row overflows to +-inf."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(48, 4)

    def forward(self, x):
        z = self.fc(x.flatten(1))
        z = torch.cat([z[:1] * 1e6, z[1:]])
        return z.half()


@pytest.mark.parametrize("attack", ["pgd", "fgsm", "apgd"])
@pytest.mark.parametrize("norm", NORMS)
def test_an_fp16_overflowing_row_keeps_its_start_and_is_counted(attack, norm):
    model = _HalfLogits()
    x, y = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3])
    eps = {"linf": 8 / 255, "l2": 0.5, "l1": 4.0}[norm]
    with pytest.warns(NonFiniteWarning, match=rf"{attack}: 1 of 4 samples"):
        out = _run(attack, model, x, y, eps=eps, norm=norm, steps=3, option=False, targeted=False, seed=0)
    assert torch.equal(out[0], x[0])  # no random start: the overflowing sample never moved
    assert not torch.equal(out[1:], x[1:])  # the others were attacked
    assert torch.isfinite(out).all() and (out >= 0).all() and (out <= 1).all()


def test_the_warning_can_be_made_an_error():
    model = Poisoned(Mlp(12), 3, p=1.0, where="output", seed=0)
    x, y = torch.rand(3, 12), torch.arange(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWarning)
        with pytest.raises(NonFiniteWarning, match="3 of 3 samples"):
            pgd(model, x, y, eps=0.1, step_size=0.05, steps=2)


@pytest.mark.parametrize("attack", ["pgd", "fgsm", "apgd"])
def test_a_train_mode_batchnorm_model_with_nan_outputs_is_left_untouched(attack):
    # train-mode BN mixes samples: one NaN row makes every gradient NaN, so no sample moves
    inner = tiny_cnn()
    inner.train()
    inner[0].eval()
    for q in inner.parameters():
        q.grad = torch.full_like(q, 0.5)
    before = {k: v.clone() for k, v in inner.state_dict().items()}

    class NaNRow0(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            z = self.inner(x)
            return torch.cat([z[:1] * float("nan"), z[1:]])

    x, y = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(6) % 4
    with pytest.warns(NonFiniteWarning, match="6 of 6"):
        out = _run(attack, NaNRow0(), x, y, eps=0.1, norm="l2", steps=3, option=False, targeted=False, seed=0)
    assert torch.equal(out, x)
    assert inner.training and not inner[0].training and inner[1].training
    assert all(torch.equal(v, before[k]) for k, v in inner.state_dict().items())
    assert all(torch.equal(q.grad, torch.full_like(q, 0.5)) for q in inner.parameters())


# ---------------------------------------------------------------------------------------------- clear errors

ATTACKS = ["pgd", "fgsm", "apgd"]


def _call(attack, model, x, y, **kw):
    kw = {"eps": 0.1, "norm": "linf", "steps": 2, "option": False, "targeted": False, "seed": 0} | kw
    return _run(attack, model, x, y, **kw)


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize(
    "output, name", [(lambda z: (z, z), "tuple"), (lambda z: {"logits": z}, "dict"), (lambda z: [z], "list")]
)
def test_a_non_tensor_output_is_a_type_error_naming_its_type(attack, output, name):
    lin = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.rand(2, 3, 2, 2), torch.tensor([0, 1])
    with pytest.raises(TypeError, match=rf"logits tensor; got {name} "):
        _call(attack, lambda z: output(lin(z)), x, y)
    # with a loss_fn that reads that output, the same model is fine
    loss_fn = lambda out, t: nn.functional.cross_entropy(  # noqa: E731
        (out["logits"] if isinstance(out, dict) else out[0]), t, reduction="none"
    )
    assert _call(attack, lambda z: output(lin(z)), x, y, loss_fn=loss_fn).shape == x.shape


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_loss_fn_that_returns_no_tensor_is_a_type_error(attack):
    lin = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(TypeError, match="loss_fn must return a tensor of losses; got float"):
        _call(attack, lin, torch.rand(2, 3, 2, 2), torch.tensor([0, 1]), loss_fn=lambda out, t: 1.0)


class _Spy(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        self.calls += 1
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("bad", [-100, -1])
def test_a_negative_label_is_refused_before_the_model_runs(attack, bad):
    spy = _Spy()
    with pytest.raises(ValueError, match=rf"hard labels in \[0, num_classes\); got a label {bad}"):
        _call(attack, spy, torch.rand(3, 12), torch.tensor([0, bad, 2]))
    assert spy.calls == 0


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_label_past_the_last_class_is_refused_after_the_first_forward(attack):
    with pytest.raises(ValueError, match=r"num_classes=3\) .*got a label 3"):
        _call(attack, _Spy(), torch.rand(3, 12), torch.tensor([0, 3, 2]))


@pytest.mark.parametrize("attack", ATTACKS)
def test_soft_targets_and_custom_losses_are_not_label_checked(attack):
    x = torch.rand(3, 12)
    soft = torch.softmax(torch.randn(3, 3), 1)
    assert _call(attack, _Spy(), x, soft).shape == x.shape

    def masked(out, t):  # a custom loss that reads -1 as "no label": its own business
        return torch.where(t >= 0, out.logsumexp(1) - out.gather(1, t.clamp(min=0)[:, None])[:, 0], 0)

    assert _call(attack, _Spy(), x, torch.tensor([0, -1, 2]), loss_fn=masked).shape == x.shape


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("eps", [8, 1.0, torch.tensor([0.01, 4.0, 0.02])])
def test_an_l_inf_eps_that_covers_the_box_warns_with_the_255_it_meant(attack, eps):
    top = float(eps.max()) if isinstance(eps, torch.Tensor) else eps
    with pytest.warns(UserWarning, match=rf"ball holds every image.*did you mean eps={top:g}/255") as caught:
        _call(attack, _Spy(), torch.rand(3, 12), torch.tensor([0, 1, 2]), eps=eps)
    assert caught[0].filename == __file__  # it points at the call, not at advtrain


def test_legitimate_radii_do_not_warn_and_the_l2_l1_analogue_does():
    x, y = torch.rand(1, 3, 224, 224), torch.tensor([0])  # steps=0: no forward is needed to check eps
    spy = _Spy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for norm, eps in [("l1", 75.0), ("l2", 2.0), ("l2", 3.0), ("linf", 16 / 255), ("linf", 0.99)]:
            pgd(spy, x, y, eps=eps, step_size=0.1, steps=0, norm=norm)
            apgd(spy, x, y, eps=eps, steps=0, norm=norm)
        pgd(spy, torch.rand(2, 12) * 255, torch.tensor([0, 1]), eps=8, step_size=2, steps=0, bounds=(0, 255))
    n = 3 * 224 * 224
    for norm, eps in [("l2", n**0.5), ("l1", float(n))]:
        with pytest.warns(UserWarning, match=rf"{norm} diameter"):
            pgd(spy, x, y, eps=eps, step_size=0.1, steps=0, norm=norm)
    assert spy.calls == 0


def test_a_non_finite_scalar_loss_holds_every_sample_back():
    # pgd accepts a scalar loss (without return_best): when it is NaN no sample's share can be told apart
    model = Mlp(12)
    x, y = torch.rand(3, 12), torch.arange(3)
    with pytest.warns(NonFiniteWarning, match="3 of 3 samples"):
        out = pgd(
            model,
            x,
            y,
            eps=0.1,
            step_size=0.05,
            steps=2,
            random_start=False,
            loss_fn=lambda out, t: out.sum() * float("nan"),
        )
    assert torch.equal(out, x)
