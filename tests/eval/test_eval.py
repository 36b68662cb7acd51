"""evaluate() and the AutoAttack wrapper."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from advtrain import pgd
from advtrain.eval import IMAGENET_EPS, autoattack, evaluate
from tests.helpers import tiny_cnn


def _data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, n, 8)], x, y


def test_clean_accuracy_and_robust_counts_match_a_direct_computation():
    model = tiny_cnn().eval()
    loader, x, y = _data()
    attack = functools.partial(pgd, eps=8 / 255, step_size=2 / 255, steps=5, random_start=False)
    r = evaluate(model, loader, attacks={"pgd": attack}, progress=False)
    with torch.no_grad():
        ok = model(x).argmax(1) == y
        adv_ok = torch.cat([model(attack(model, xb, yb)).argmax(1) == yb for xb, yb in loader])
    assert r.n == 24
    assert r.clean == pytest.approx(float(ok.float().mean()))
    assert r.robust["pgd"] == pytest.approx(float((ok & adv_ok).float().mean()))
    assert r.robust["pgd"] <= r.clean


def test_model_modes_are_restored_and_max_samples_cuts():
    model = tiny_cnn()
    model.train()
    loader, _, _ = _data()
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    r = evaluate(model, loader, max_samples=10, progress=False)
    assert r.n == 10
    assert seen and not any(seen)  # ran in eval mode
    assert model.training and all(m.training for m in model.modules())


def test_log_every_prints_a_summary_line(capsys):
    model = tiny_cnn().eval()
    loader, _, _ = _data()
    evaluate(model, loader, progress=True, log_every=1, desc="val")
    err = capsys.readouterr()
    assert "[val] batch 3: 24 samples" in err.out + err.err


def test_empty_loader_and_bad_max_samples():
    with pytest.raises(ValueError, match="no samples"):
        evaluate(tiny_cnn(), [], progress=False)
    with pytest.raises(ValueError, match="max_samples"):
        evaluate(tiny_cnn(), [], max_samples=0, progress=False)


def test_report_table_lists_every_metric():
    model = tiny_cnn().eval()
    loader, _, _ = _data()
    r = evaluate(
        model, loader, attacks={"pgd20": functools.partial(pgd, eps=0.01, step_size=0.005, steps=2)}, progress=False
    )
    t = r.table()
    assert "| clean |" in t and "| pgd20 |" in t and "24 samples" in t


class _Linear10(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)) * 5


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_autoattack_stays_in_the_ball_and_leaves_the_model_untouched(norm):
    model = _Linear10().eval()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 3, 4, 4, generator=g), torch.randint(0, 10, (16,), generator=g)
    eps = {"linf": 0.05, "l2": 0.5, "l1": 2.0}[norm]
    x_adv = autoattack(model, x, y, norm=norm, eps=eps, version="custom", attacks=["apgd-ce", "fab-t"])
    d = (x_adv - x).flatten(1)
    size = {"linf": d.abs().amax(1), "l2": d.norm(dim=1), "l1": d.abs().sum(1)}[norm]
    assert (size <= eps * (1 + 1e-5)).all() and (x_adv >= 0).all() and (x_adv <= 1).all()
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == y).float().mean() <= (model(x).argmax(1) == y).float().mean()


@pytest.mark.slow
def test_autoattack_standard_version_runs_with_fewer_than_ten_classes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    x, y = torch.rand(6, 3, 2, 2), torch.randint(0, 3, (6,))
    x_adv = autoattack(model, x, y, norm="linf", eps=IMAGENET_EPS["linf"])
    assert x_adv.shape == x.shape and (x_adv - x).abs().max() <= IMAGENET_EPS["linf"] + 1e-6


def test_autoattack_bad_input():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.rand(2, 3, 2, 2), torch.arange(2)
    with pytest.raises(ValueError, match="unknown norm"):
        autoattack(model, x, y, norm="l3", eps=0.1)
    with pytest.raises(ValueError, match="version"):
        autoattack(model, x, y, norm="linf", eps=0.1, version="fast")
    with pytest.raises(ValueError, match="custom"):
        autoattack(model, x, y, norm="linf", eps=0.1, version="custom", attacks=["pgd"])
    with pytest.raises(ValueError, match="eps"):
        autoattack(model, x, y, norm="linf", eps=-1.0)
    with pytest.raises(ValueError, match="inside bounds"):
        autoattack(model, x + 2, y, norm="linf", eps=0.1)
