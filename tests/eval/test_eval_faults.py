"""evaluate() under faults: non-finite logits, empty batches, and bad inputs refused in one line (issues 17, 21)."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch import nn

from advtrain import pgd
from advtrain.attacks import NonFiniteWarning
from advtrain.eval import EvalReport, evaluate
from tests.helpers import tiny_cnn

PGD = functools.partial(pgd, eps=8 / 255, step_size=2 / 255, steps=2, random_start=False)


def _data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, n, 8)], x, y


class _Const(nn.Module):
    """Logits ``value`` everywhere (0 * x keeps a graph to the input, so attacks can run)."""

    def __init__(self, value: float, classes: int = 4):
        super().__init__()
        self.value, self.classes = value, classes

    def forward(self, x):
        return torch.full((x.shape[0], self.classes), self.value) + 0 * x.flatten(1)[:, :1]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_diverged_model_scores_zero_and_is_reported(value):
    # all-NaN logits: argmax is 0, so class-0 labels used to count as correct (100% clean and robust)
    x = torch.rand(8, 3, 4, 4)
    loader = [(x, torch.zeros(8, dtype=torch.long))]
    with pytest.warns(NonFiniteWarning, match="clean 8 of 8 samples"):
        r = evaluate(_Const(value), loader, attacks={"pgd": PGD}, progress=False)
    assert (r.n, r.clean, r.robust["pgd"]) == (8, 0.0, 0.0)
    assert r.nonfinite == {"clean": 8, "pgd": 0}  # the attack never ran: no sample was correct
    assert "| clean | 0.00 | 8 |" in r.table() and "| metric | accuracy (%) | non-finite |" in r.table()


def test_non_finite_logits_under_attack_count_as_not_robust():
    base = tiny_cnn().eval()

    class NaNAwayFromX(nn.Module):
        """The clean model on the clean images; NaN logits on any other input (the attacked ones)."""

        def __init__(self, clean_x):
            super().__init__()
            self.base, self.clean_x = base, clean_x

        def forward(self, x):
            z = self.base(x)
            seen = (x.flatten(1)[:, None] == self.clean_x.flatten(1)[None]).all(2).any(1)
            return torch.where(seen[:, None], z, float("nan"))

    loader, x, y = _data()
    model = NaNAwayFromX(x)
    with torch.no_grad():
        correct = int((base(x).argmax(1) == y).sum())
    assert correct > 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = evaluate(model, loader, attacks={"pgd": PGD}, progress=False)
    messages = [str(w.message) for w in caught if w.category is NonFiniteWarning]
    assert f"eval: non-finite logits (NaN/inf) counted as wrong: pgd {correct} of 16 samples" in messages
    assert any(m.startswith("pgd: ") for m in messages)  # the attack's own: its second step met the NaN
    assert r.clean == pytest.approx(correct / 16)
    assert r.robust["pgd"] == 0.0 and r.nonfinite == {"clean": 0, "pgd": correct}


def test_a_single_nan_row_is_wrong_and_the_others_are_scored():
    base = tiny_cnn().eval()

    class NaNRow0(nn.Module):
        def forward(self, x):
            z = base(x)
            return torch.cat([z[:1] * float("nan"), z[1:]])

    loader, x, y = _data(8)
    with torch.no_grad():
        expect = int((base(x[1:]).argmax(1) == y[1:]).sum())
    with pytest.warns(NonFiniteWarning, match="clean 1 of 8"):
        r = evaluate(NaNRow0(), loader, progress=False)
    assert r.clean == pytest.approx(expect / 8) and r.nonfinite["clean"] == 1


def test_empty_batches_are_skipped_and_an_all_empty_loader_is_a_clear_error():
    loader, x, y = _data()
    model = tiny_cnn().eval()
    ref = evaluate(model, loader, attacks={"pgd": PGD}, progress=False)
    empty = (x[:0], y[:0])
    r = evaluate(model, [empty, loader[0], empty, loader[1]], attacks={"pgd": PGD}, progress=True, log_every=1)
    assert (r.n, r.clean, r.robust) == (ref.n, ref.clean, ref.robust)
    with pytest.raises(ValueError, match=r"no samples \(3 batches, all empty\)"):
        evaluate(model, [empty] * 3, progress=False)
    with pytest.raises(ValueError, match=r"no samples \(no batches\)"):
        evaluate(model, [], progress=False)


def test_dict_batches_with_common_keys_are_read():
    loader, _, _ = _data()
    model = tiny_cnn().eval()
    ref = evaluate(model, loader, progress=False)
    for kx, ky in [("image", "label"), ("images", "labels"), ("pixel_values", "labels")]:
        r = evaluate(model, [{kx: xb, ky: yb, "path": "ignored"} for xb, yb in loader], progress=False)
        assert (r.n, r.clean) == (ref.n, ref.clean), (kx, ky)


def test_a_report_built_by_hand_keeps_working():
    r = EvalReport(10, 0.5, {"pgd": 0.3}, 1.0)
    assert r.nonfinite == {} and "| pgd | 30.00 | 0 |" in r.table()


# ---------------------------------------------------------------------------------------------- bad input

X, Y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])

BAD = [
    ([((X * 255).to(torch.uint8), Y)], {}, TypeError, r"got torch\.uint8 \(convert with x\.float\(\) / 255\)"),
    (
        [{"img_bytes": X, "cls_id": Y}],
        {},
        ValueError,
        r"dict with keys \['cls_id', 'img_bytes'\]; .*\('image', 'label'\)",
    ),
    ([(X, Y)], {"attacks": [PGD]}, TypeError, r"attacks must be a dict name -> attack.*got list"),
    ([(X, Y)], {"attacks": PGD}, TypeError, r"attacks must be a dict name -> attack.*got partial"),
    ([(X, Y)], {"attacks": {"pgd": "pgd"}}, TypeError, r"attacks\['pgd'\] must be callable"),
    ([(X[0], 1)], {}, ValueError, r"images of shape \(3, 8, 8\) with one label: a batch dimension is missing"),
    ([(X[0], torch.tensor(1))], {}, ValueError, r"a batch dimension is missing"),
    ([(X[0], Y[:2])], {}, ValueError, r"if x is one \(C, H, W\) image, a batch dimension is missing"),
    ([(X, Y[:3])], {}, ValueError, r"labels must be \(4,\) like the images' batch; got labels of shape \(3,\)"),
    ([(X, Y.float())], {}, TypeError, r"labels must be integer class indices; got torch\.float32"),
    ([(X, [0, 1, 2, 3])], {}, TypeError, r"labels must be a torch\.Tensor"),
    ([(X.numpy(), Y)], {}, TypeError, r"images must be a torch\.Tensor; got ndarray"),
    ([(X, Y + 1)], {}, ValueError, r"labels must be in \[0, 4\) .*got min 1, max 4"),
    ([(X, Y - 1)], {}, ValueError, r"labels must be in \[0, 4\) .*got min -1"),
    ([X], {}, TypeError, r"batch 0 must be an \(x, y\) pair or a dict; got Tensor"),
    ([(X,)], {}, ValueError, r"must be an \(x, y\) pair; got a tuple of 1"),
    ([(X, Y)], {"max_samples": 0}, ValueError, r"max_samples must be >= 1"),
]


@pytest.mark.parametrize("loader, kw, error, match", BAD)
def test_bad_input_is_refused_in_one_line(loader, kw, error, match):
    with pytest.raises(error, match=match) as info:
        evaluate(tiny_cnn().eval(), loader, progress=False, **kw)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "output, match",
    [
        (lambda z: (z, z), r"got tuple"),
        (lambda z: {"logits": z}, r"got dict"),
        (lambda z: z[:, 0], r"must be \(4, K\) logits; got shape \(4,\)"),
    ],
)
def test_a_model_that_returns_no_logits_tensor_is_refused(output, match):
    base = tiny_cnn().eval()
    with pytest.raises((TypeError, ValueError), match=match):
        evaluate(lambda x: output(base(x)), [(X, Y)], progress=False)


def test_an_attack_that_returns_no_images_is_refused():
    model = _Const(0.0)  # argmax 0: sample 0 is correct, so the attack runs
    with pytest.raises(TypeError, match=r"attack 'bad' must return the adversarial images as a tensor; got tuple"):
        evaluate(model, [(X, Y)], attacks={"bad": lambda m, x, y: (x, y)}, progress=False)
    with pytest.raises(ValueError, match=r"attack 'bad' returned shape \(3, 8, 8\) for inputs \(1, 3, 8, 8\)"):
        evaluate(model, [(X, Y)], attacks={"bad": lambda m, x, y: x[0]}, progress=False)
