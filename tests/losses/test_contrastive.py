"""The frozen-text contrastive loss (AdvXL Eq. 2), its temperature, its module form, and its attack (Eq. 3)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from open_clip.loss import ClipLoss
from torch import nn

from advtrain import pgd
from advtrain.losses import (
    INIT_LOGIT_SCALE,
    MAX_LOGIT_SCALE,
    ClipContrastiveLoss,
    clip_contrastive_loss,
    contrastive_attack_loss,
    embed_texts,
    logit_scale_value,
)

LOG_MAX = math.log(MAX_LOGIT_SCALE)


def _features(seed: int, b: int, d: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=dtype), torch.randn(b, d, generator=g, dtype=dtype)


def _naive(f: torch.Tensor, g: torch.Tensor, t: float, direction: str) -> list[float]:
    """Per-sample losses with Python loops over the batch: the definition, written out."""
    s = min(math.exp(t), MAX_LOGIT_SCALE)
    f, g = f.double().tolist(), g.double().tolist()
    b = len(f)

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    u, v = [unit(r) for r in f], [unit(r) for r in g]
    z = [[s * sum(a * c for a, c in zip(u[i], v[j])) for j in range(b)] for i in range(b)]

    def lse(xs):
        m = max(xs)
        return m + math.log(sum(math.exp(x - m) for x in xs))

    out = []
    for i in range(b):
        image_to_text = lse(z[i]) - z[i][i]
        text_to_image = lse([z[j][i] for j in range(b)]) - z[i][i]
        out.append(image_to_text if direction == "image_to_text" else (image_to_text + text_to_image) / 2)
    return out


# ------------------------------------------------------------------------------------------------------------
# The loss against its definition, and its invariants


@given(
    seed=st.integers(0, 2**31 - 1),
    b=st.integers(1, 7),
    d=st.integers(1, 6),
    t=st.floats(-3.0, 7.0),
    direction=st.sampled_from(["symmetric", "image_to_text"]),
)
def test_matches_a_naive_loop(seed, b, d, t, direction):
    f, g = _features(seed, b, d)
    got = clip_contrastive_loss(f, g, logit_scale=t, direction=direction, reduction="none")
    torch.testing.assert_close(
        got, torch.tensor(_naive(f, g, t, direction), dtype=torch.float64), rtol=1e-10, atol=1e-10
    )
    torch.testing.assert_close(clip_contrastive_loss(f, g, logit_scale=t, direction=direction), got.mean())
    torch.testing.assert_close(
        clip_contrastive_loss(f, g, logit_scale=t, direction=direction, reduction="sum"), got.sum()
    )


@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 8), t=st.floats(-2.0, 4.0))
@settings(max_examples=50)
def test_mean_equals_open_clip_clip_loss(seed, b, t):
    f, g = _features(seed, b, 5, torch.float32)
    nf, ng = nn.functional.normalize(f, dim=1), nn.functional.normalize(g, dim=1)
    ref = ClipLoss()(nf, ng, logit_scale=torch.tensor(math.exp(t)))
    torch.testing.assert_close(clip_contrastive_loss(f, g, logit_scale=t), ref, rtol=1e-5, atol=1e-6)


@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 7), d=st.integers(1, 6), t=st.floats(-3.0, 6.0))
def test_symmetric_when_the_modalities_are_swapped(seed, b, d, t):
    f, g = _features(seed, b, d)
    fg = clip_contrastive_loss(f, g, logit_scale=t, reduction="none")
    torch.testing.assert_close(clip_contrastive_loss(g, f, logit_scale=t, reduction="none"), fg)
    # and the symmetric loss is the mean of the two one-sided losses, one per modality
    i2t = clip_contrastive_loss(f, g, logit_scale=t, direction="image_to_text", reduction="none")
    t2i = clip_contrastive_loss(g, f, logit_scale=t, direction="image_to_text", reduction="none")
    torch.testing.assert_close(fg, (i2t + t2i) / 2)


@given(
    seed=st.integers(0, 2**31 - 1),
    b=st.integers(1, 6),
    d=st.integers(1, 6),
    log_a=st.floats(-6.0, 6.0),
    log_c=st.floats(-6.0, 6.0),
    t=st.floats(-3.0, 6.0),
)
def test_invariant_to_the_scale_of_the_features(seed, b, d, log_a, log_c, t):
    f, g = _features(seed, b, d)
    base = clip_contrastive_loss(f, g, logit_scale=t, reduction="none")
    scaled = clip_contrastive_loss(math.exp(log_a) * f, math.exp(log_c) * g, logit_scale=t, reduction="none")
    torch.testing.assert_close(scaled, base, rtol=1e-10, atol=1e-10)


@given(seed=st.integers(0, 2**31 - 1), b=st.integers(2, 7))
@settings(max_examples=50)
def test_permuting_the_pairs_permutes_the_losses(seed, b):
    f, g = _features(seed, b, 4)
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(seed))
    base = clip_contrastive_loss(f, g, logit_scale=2.0, reduction="none")
    torch.testing.assert_close(clip_contrastive_loss(f[perm], g[perm], logit_scale=2.0, reduction="none"), base[perm])


@pytest.mark.parametrize("b", [1, 2, 5])
def test_closed_form_on_aligned_orthonormal_pairs(b):
    # z = s I: every row and column is log(b - 1 + e^s) - s
    s = 7.0
    e = torch.eye(b, dtype=torch.float64)
    expected = math.log(b - 1 + math.exp(s)) - s
    got = clip_contrastive_loss(3 * e, e, logit_scale=math.log(s), reduction="none")
    torch.testing.assert_close(got, torch.full((b,), expected, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------------------
# The temperature


@given(t=st.floats(-5.0, 12.0))
def test_logit_scale_value_is_exp_clamped_at_100(t):
    assert float(logit_scale_value(t)) == pytest.approx(min(math.exp(t), 100.0), rel=1e-6)


@given(excess=st.floats(1e-3, 8.0), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=50)
def test_temperature_clamp(excess, seed):
    f, g = _features(seed, 5, 4)
    above = torch.tensor(LOG_MAX + excess, dtype=torch.float64, requires_grad=True)
    at_cap = clip_contrastive_loss(f, g, logit_scale=LOG_MAX)
    loss = clip_contrastive_loss(f, g, logit_scale=above)
    torch.testing.assert_close(loss, at_cap)  # logits are never scaled beyond 100
    (grad,) = torch.autograd.grad(loss, above)
    assert grad == 0  # the parameter stops growing past the cap
    below = torch.tensor(LOG_MAX - excess, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(clip_contrastive_loss(f, g, logit_scale=below), below)
    assert grad != 0


def test_custom_cap():
    f, g = _features(0, 4, 3)
    torch.testing.assert_close(
        clip_contrastive_loss(f, g, logit_scale=5.0, max_scale=10.0),
        clip_contrastive_loss(f, g, logit_scale=math.log(10.0)),
    )


# ------------------------------------------------------------------------------------------------------------
# Gradients


def test_no_gradient_reaches_the_text_features():
    f, g = _features(1, 6, 5)
    f.requires_grad_(True)
    g.requires_grad_(True)  # even when the caller hands in text features with a graph
    t = torch.tensor(INIT_LOGIT_SCALE, dtype=torch.float64, requires_grad=True)
    clip_contrastive_loss(f, g, logit_scale=t).backward()
    assert g.grad is None
    assert f.grad is not None and f.grad.abs().sum() > 0
    assert t.grad is not None and t.grad != 0


def test_gradcheck_in_the_image_features_and_the_temperature():
    f, g = _features(2, 4, 3)
    f.requires_grad_(True)
    t = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    for direction in ("symmetric", "image_to_text"):
        assert torch.autograd.gradcheck(
            lambda f_, t_: clip_contrastive_loss(f_, g, logit_scale=t_, direction=direction, reduction="none"), (f, t)
        )


def test_low_precision_features_compute_in_float32():
    f, g = _features(3, 4, 8, torch.float32)
    out = clip_contrastive_loss(f.bfloat16(), g.bfloat16(), logit_scale=2.0, reduction="none")
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out, clip_contrastive_loss(f.bfloat16().float(), g.bfloat16().float(), logit_scale=2.0, reduction="none")
    )


# ------------------------------------------------------------------------------------------------------------
# The module


@pytest.mark.parametrize("direction", ["symmetric", "image_to_text"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_module_agrees_with_the_function(direction, reduction):
    f, g = _features(4, 6, 5, torch.float32)
    module = ClipContrastiveLoss(init_scale=20.0, direction=direction, reduction=reduction)
    expected = clip_contrastive_loss(f, g, logit_scale=math.log(20.0), direction=direction, reduction=reduction)
    torch.testing.assert_close(module(f, g), expected)


def test_module_temperature_is_learnable_from_clips_init():
    module = ClipContrastiveLoss()
    assert [n for n, _ in module.named_parameters()] == ["logit_scale"]
    assert float(module.logit_scale.detach()) == pytest.approx(INIT_LOGIT_SCALE) == pytest.approx(math.log(1 / 0.07))
    f, g = _features(5, 4, 3, torch.float32)
    module(f, g).backward()
    assert module.logit_scale.grad is not None and module.logit_scale.grad != 0
    fixed = ClipContrastiveLoss(learnable=False)
    assert list(fixed.parameters()) == [] and "logit_scale" in fixed.state_dict()


# ------------------------------------------------------------------------------------------------------------
# The attack (Eq. 3)


def _image_encoder(d: int, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, d)
        ).eval()


@pytest.mark.parametrize("direction", ["symmetric", "image_to_text"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_with_this_loss_raises_the_loss(tower, direction, norm):
    captions = [f"a photo of a {c}." for c in ["cat", "dog", "ship", "frog", "truck", "bird", "deer", "horse"]]
    text = embed_texts(tower, captions)
    model = _image_encoder(tower.embed_dim)
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    loss_fn = contrastive_attack_loss(logit_scale=INIT_LOGIT_SCALE, direction=direction)
    eps = 8 / 255 if norm == "linf" else 0.5
    x_adv = pgd(
        model,
        x,
        text,
        eps=eps,
        step_size=eps / 3,
        steps=5,
        norm=norm,
        loss_fn=loss_fn,
        random_start=False,
        return_best=True,
    )
    clean, adv = loss_fn(model(x), text), loss_fn(model(x_adv), text)
    assert clean.shape == adv.shape == (8,)
    assert adv.mean() > clean.mean() + 1e-3
    if direction == "image_to_text":  # separable per sample: the best iterate is never worse than the start
        assert (adv >= clean - 1e-6).all()


def test_attack_loss_never_touches_the_temperature(tower):
    module = ClipContrastiveLoss()
    text = embed_texts(tower, ["a photo of a 1.", "a photo of a 2."])
    model = _image_encoder(tower.embed_dim)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    loss_fn = contrastive_attack_loss(logit_scale=module.logit_scale)
    pgd(model, x, text, eps=4 / 255, step_size=1 / 255, steps=2, loss_fn=loss_fn, random_start=False)
    assert module.logit_scale.grad is None
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        module.logit_scale.fill_(0.0)  # the adapter reads the current value
    torch.testing.assert_close(
        loss_fn(model(x), text), clip_contrastive_loss(model(x), text, logit_scale=0.0, reduction="none")
    )


# ------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("f", "g", "kw", "error"),
    [
        (torch.zeros(4, 3), torch.zeros(4, 2), {}, ValueError),  # dimension mismatch (no projection)
        (torch.zeros(4, 3), torch.zeros(5, 3), {}, ValueError),  # batch mismatch
        (torch.zeros(4), torch.zeros(4), {}, ValueError),
        (torch.zeros(0, 3), torch.zeros(0, 3), {}, ValueError),
        (torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 3), {}, TypeError),
        (torch.zeros(4, 3).tolist(), torch.zeros(4, 3), {}, TypeError),
        (torch.zeros(4, 3), torch.zeros(4, 3), {"direction": "text_to_image"}, ValueError),
        (torch.zeros(4, 3), torch.zeros(4, 3), {"reduction": "batchmean"}, ValueError),
        (torch.zeros(4, 3), torch.zeros(4, 3), {"logit_scale": torch.zeros(2)}, ValueError),
        (torch.zeros(4, 3), torch.zeros(4, 3), {"logit_scale": float("nan")}, ValueError),
        (torch.zeros(4, 3), torch.zeros(4, 3), {"logit_scale": "2.0"}, TypeError),
        (torch.zeros(4, 3), torch.zeros(4, 3), {"logit_scale": torch.tensor(2)}, TypeError),
        (torch.zeros(4, 3), torch.zeros(4, 3), {"max_scale": 0.0}, ValueError),
    ],
)
def test_bad_input_raises(f, g, kw, error):
    kw = {"logit_scale": 1.0, **kw}
    with pytest.raises(error):
        clip_contrastive_loss(f, g, **kw)


def test_bad_adapter_and_module_arguments_raise_at_build_time():
    with pytest.raises(ValueError):
        contrastive_attack_loss(logit_scale=1.0, direction="both")
    with pytest.raises(TypeError):
        contrastive_attack_loss(logit_scale=None)
    with pytest.raises(ValueError):
        ClipContrastiveLoss(init_scale=1000.0)
    with pytest.raises(ValueError):
        ClipContrastiveLoss(init_scale=0.0)
