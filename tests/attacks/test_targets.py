"""random_targets: never the label, uniform over the other classes, reproducible from its generator."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from advtrain import cross_entropy, pgd
from advtrain.attacks import random_targets
from tests.helpers import tiny_cnn


@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(0, 64), classes=st.integers(2, 1000))
def test_the_target_is_another_valid_class_and_the_same_generator_gives_the_same_targets(seed, batch, classes):
    y = torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(seed + 1))
    t = random_targets(y, classes, generator=torch.Generator().manual_seed(seed))
    assert t.shape == y.shape and t.dtype == torch.int64 and t.device == y.device
    assert bool((t != y).all()) and bool(((t >= 0) & (t < classes)).all())
    assert torch.equal(t, random_targets(y, classes, generator=torch.Generator().manual_seed(seed)))


def test_targets_are_uniform_over_the_other_classes():
    classes, n = 5, 40_000
    y = torch.full((n,), 2)
    t = random_targets(y, classes, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(t, minlength=classes).double() / n
    assert counts[2] == 0
    # 4 classes of 1/4 each: the standard error of one frequency is sqrt(p(1-p)/n) ~ 0.0022
    assert torch.allclose(counts[[0, 1, 3, 4]], torch.full((4,), 0.25, dtype=torch.float64), atol=0.01)


def test_two_classes_always_target_the_other_one():
    y = torch.tensor([0, 1, 1, 0])
    assert random_targets(y, 2, generator=torch.Generator().manual_seed(3)).tolist() == [1, 0, 0, 1]


@pytest.mark.parametrize(
    "y, classes, error, match",
    [
        (torch.tensor([0.0, 1.0]), 3, TypeError, "integer tensor"),
        (torch.tensor([0, 1]), 3.0, TypeError, "num_classes must be an int"),
        (torch.tensor([[0, 1]]), 3, ValueError, r"\(B,\) labels"),
        (torch.tensor([0, 0]), 1, ValueError, "num_classes >= 2"),
        (torch.tensor([0, 3]), 3, ValueError, r"\[0, 3\); got min 0, max 3"),
        (torch.tensor([-1, 0]), 3, ValueError, "min -1"),
    ],
)
def test_bad_input_raises_a_named_error(y, classes, error, match):
    with pytest.raises(error, match=match):
        random_targets(y, classes)


def test_a_targeted_pgd_towards_random_targets_lowers_the_target_loss():
    model = tiny_cnn(classes=10, seed=0).eval()
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(2))
    t = random_targets(y, 10, generator=torch.Generator().manual_seed(3))
    x_adv = pgd(model, x, t, eps=8 / 255, step_size=2 / 255, steps=5, targeted=True, random_start=False)
    with torch.no_grad():
        before, after = cross_entropy(model(x), t, reduction="none"), cross_entropy(model(x_adv), t, reduction="none")
    assert (after < before).float().mean() >= 0.9 and after.mean() < before.mean()
