"""DetachedParams: same attack as through the model, and a compiled backward that computes only the input gradient."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from advtrain.attacks import DetachedParams, apgd, detach_params, fgsm, pgd


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5))


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(6, 3, 4, 4, generator=g), torch.randint(0, 5, (6,), generator=g)


def _counting_backend(record: list[int]):
    """An AOTAutograd backend that records how many gradients each compiled backward graph returns."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def bw(gm, example_inputs):
        (outputs,) = [n for n in gm.graph.nodes if n.op == "output"][0].args
        record.append(sum(o is not None for o in outputs))
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=lambda gm, ex: make_boxed_func(gm.forward), bw_compiler=bw)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
@pytest.mark.parametrize("attack", [pgd, apgd, fgsm])
def test_attacks_through_the_view_equal_attacks_through_the_model(attack, norm):
    model, (x, y) = _cnn().eval(), _data()
    kw = dict(eps={"linf": 8 / 255, "l2": 0.5, "l1": 2.0}[norm], norm=norm)
    if attack is pgd:
        kw |= dict(step_size=kw["eps"] / 4, steps=3)
    if attack is apgd:
        kw |= dict(steps=3)
    a = attack(model, x, y, **kw, generator=torch.Generator().manual_seed(1))
    b = attack(DetachedParams(model), x, y, **kw, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_input_gradient_is_the_models_and_no_parameter_gradient_flows():
    model, (x, y) = _cnn().eval(), _data()
    xa = x.clone().requires_grad_(True)
    (g_model,) = torch.autograd.grad(nn.functional.cross_entropy(model(xa), y), xa)
    out = detach_params(model)(xa)
    (g_view,) = torch.autograd.grad(nn.functional.cross_entropy(out, y), xa, retain_graph=True)
    assert torch.equal(g_model, g_view)
    params = list(model.parameters())
    assert all(g is None for g in torch.autograd.grad(out.sum(), params, allow_unused=True))


def test_train_mode_uses_the_modules_own_buffers_and_the_attack_restores_them():
    model, (x, y) = _cnn().train(), _data()
    view = DetachedParams(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    view(x)  # a bare forward in train mode updates the module's running statistics, as the module would
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])
    model.load_state_dict(before)
    pgd(view, x, y, eps=8 / 255, step_size=2 / 255, steps=2, generator=torch.Generator().manual_seed(0))
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert list(view.parameters()) == list(model.parameters()) and len(view.state_dict()) == len(before)


def test_keyword_arguments_reach_the_module():
    class WithIndices(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x, indices=None):
            return self.lin(x if indices is None else x[:, indices])

    m = WithIndices()
    m.lin = nn.Linear(2, 3)
    x = torch.rand(5, 4)
    idx = torch.tensor([0, 2])
    assert torch.equal(DetachedParams(m)(x, indices=idx), m(x, indices=idx))
    partial = functools.partial(DetachedParams(m), indices=idx)
    out = pgd(partial, x, torch.zeros(5, dtype=torch.long), eps=0.1, step_size=0.05, steps=1, random_start=False)
    assert out.shape == x.shape


def test_only_modules_can_be_viewed():
    with pytest.raises(TypeError, match="nn.Module"):
        DetachedParams(lambda x: x)


@pytest.mark.slow
def test_compiled_backward_computes_only_the_input_gradient_through_the_view():
    """The cause of the compiled attack's cost, and the fix: count the gradients each compiled backward returns."""
    model, (x, y) = _cnn().eval(), _data()
    n_params = len(list(model.parameters()))
    counts = {}
    for name, target in (("model", model), ("view", detach_params(model))):
        torch._dynamo.reset()
        record: list[int] = []
        compiled = torch.compile(target, backend=_counting_backend(record))
        a = pgd(compiled, x, y, eps=8 / 255, step_size=2 / 255, steps=2, generator=torch.Generator().manual_seed(0))
        b = pgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=2, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(a, b, atol=1e-6)
        counts[name] = record
    torch._dynamo.reset()
    # through the model: every parameter's gradient plus the input's, although autograd.grad asks for the input only
    assert counts["model"] == [n_params + 1]
    assert counts["view"] == [1]
