"""Attack strength against a reference: our PGD-20 is at least as strong as torchattacks' PGD-20 on MNIST."""

from __future__ import annotations

import functools

import pytest
import torch

from advtrain import pgd
from advtrain.eval import evaluate
from tests.helpers_mnist import trained_mnist_cnn

torchattacks = pytest.importorskip("torchattacks", reason="torchattacks is the reference attack for this check")


@pytest.mark.slow
def test_pgd20_is_no_weaker_than_torchattacks(shared_datasets):
    model, x, y = trained_mnist_cnn(str(shared_datasets / "mnist"))
    eps, alpha = 0.1, 0.01
    loader = [(x[i : i + 250], y[i : i + 250]) for i in range(0, x.shape[0], 250)]

    def reference(m, xb, yb):
        return torchattacks.PGD(m, eps=eps, alpha=alpha, steps=20, random_start=True)(xb, yb)

    ours = functools.partial(pgd, eps=eps, step_size=alpha, steps=20, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    r = evaluate(model, loader, attacks={"advtrain": ours, "torchattacks": reference}, progress=False)
    print(
        f"\nMNIST 1k, eps {eps}: clean {r.clean:.3f}, advtrain PGD-20 {r.robust['advtrain']:.3f}, "
        f"torchattacks PGD-20 {r.robust['torchattacks']:.3f}"
    )
    assert r.clean > 0.95  # the model is trained: the comparison means something
    assert r.robust["advtrain"] < r.clean - 0.05  # and the attack bites
    assert r.robust["advtrain"] <= r.robust["torchattacks"] + 0.01
