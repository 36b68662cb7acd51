"""Zero-shot evaluation through the frozen text tower: classifier weights, the head, and attacks through it."""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from advtrain import cross_entropy, pgd
from advtrain.losses import (
    CAPTION_TEMPLATES,
    IMAGENET_TEMPLATES,
    TextCache,
    ZeroShotHead,
    clip_contrastive_loss,
    embed_texts,
    text_classifier,
    zero_shot_logits,
)

CLASSES = ["airplane", "automobile", "bird", "cat"]


def test_classifier_is_the_renormalized_mean_of_normalized_prompt_embeddings(tower):
    w = text_classifier(tower, CLASSES, templates=IMAGENET_TEMPLATES)
    assert w.shape == (len(CLASSES), tower.embed_dim) and w.dtype == torch.float32
    for k, name in enumerate(CLASSES):  # the definition, one class at a time
        g = nn.functional.normalize(tower(tower.tokenize([t.format(name) for t in IMAGENET_TEMPLATES])), dim=1)
        mean = g.mean(0)
        torch.testing.assert_close(w[k], mean / mean.norm(), rtol=1e-4, atol=1e-5)  # other batches


def test_one_template_is_the_caption_embedding(tower):
    w = text_classifier(tower, CLASSES, templates=CAPTION_TEMPLATES)
    torch.testing.assert_close(w, embed_texts(tower, [f"a photo of a {c}." for c in CLASSES]))


def test_callable_templates_match_format_strings(tower):
    callables = open_clip.OPENAI_IMAGENET_TEMPLATES[:3]
    strings = [t("{}") for t in callables]
    torch.testing.assert_close(
        text_classifier(tower, CLASSES, templates=callables), text_classifier(tower, CLASSES, templates=strings)
    )


def test_classifier_prompts_are_cached(tower):
    cache = TextCache()
    w = text_classifier(tower, CLASSES, templates=IMAGENET_TEMPLATES[:2], cache=cache)
    assert len(cache) == len(CLASSES) * 2
    torch.testing.assert_close(text_classifier(tower, CLASSES, templates=IMAGENET_TEMPLATES[:2], cache=cache), w)


@pytest.mark.parametrize(
    ("names", "templates", "error"),
    [
        ([], CAPTION_TEMPLATES, ValueError),
        ("cat", CAPTION_TEMPLATES, ValueError),
        (["cat", 3], CAPTION_TEMPLATES, TypeError),
        (CLASSES, [], ValueError),
        (CLASSES, ["a photo"], ValueError),  # no slot for the class name
        (CLASSES, ["{} and {}"], ValueError),
        (CLASSES, [3], TypeError),
    ],
)
def test_text_classifier_bad_input_raises(tower, names, templates, error):
    with pytest.raises(error):
        text_classifier(tower, names, templates=templates)


# ------------------------------------------------------------------------------------------------------------
# The logits and the head


@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 5), k=st.integers(1, 5), t=st.floats(-2.0, 6.0))
@settings(max_examples=50)
def test_logits_are_the_image_to_text_logits_of_the_contrastive_loss(seed, b, k, t):
    g = torch.Generator().manual_seed(seed)
    f, w = torch.randn(b, 6, generator=g, dtype=torch.float64), torch.randn(k, 6, generator=g, dtype=torch.float64)
    z = zero_shot_logits(f, w, logit_scale=t)
    s = min(math.exp(t), 100.0)
    expected = s * nn.functional.normalize(f, dim=1) @ nn.functional.normalize(w, dim=1).T
    torch.testing.assert_close(z, expected)
    if b == k:  # the contrastive loss's image side is cross-entropy on these logits with the diagonal as labels
        torch.testing.assert_close(
            clip_contrastive_loss(f, w, logit_scale=t, direction="image_to_text", reduction="none"),
            cross_entropy(z, torch.arange(b), reduction="none"),
        )


def test_head_agrees_with_the_function_and_holds_frozen_buffers(tower):
    w = text_classifier(tower, CLASSES, templates=CAPTION_TEMPLATES)
    scale = nn.Parameter(torch.tensor(3.0))
    head = ZeroShotHead(w, logit_scale=scale)
    f = torch.randn(5, tower.embed_dim, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(head(f), zero_shot_logits(f, w, logit_scale=3.0))
    assert list(head.parameters()) == [] and set(head.state_dict()) == {"classifier", "logit_scale"}
    with torch.no_grad():
        scale.fill_(0.0)  # the head copied the value
    torch.testing.assert_close(head(f), zero_shot_logits(f, w, logit_scale=3.0))


@pytest.mark.parametrize(
    ("f", "w", "error"),
    [
        (torch.zeros(2, 3), torch.zeros(4, 5), ValueError),
        (torch.zeros(3), torch.zeros(4, 3), ValueError),
        (torch.zeros(2, 3, dtype=torch.long), torch.zeros(4, 3), TypeError),
    ],
)
def test_logits_bad_input_raises(f, w, error):
    with pytest.raises(error):
        zero_shot_logits(f, w, logit_scale=1.0)


# ------------------------------------------------------------------------------------------------------------
# Evaluating an image model through the head: top-1, PGD, AutoAttack


def _prototype_model(classifier: torch.Tensor, pixels: int, seed: int = 0):
    """An image model whose features point at class k's text weights on the +-1 pattern p_k: x = 0.5 + 0.4 p_k."""
    g = torch.Generator().manual_seed(seed)
    k = classifier.shape[0]
    patterns = torch.randint(0, 2, (k, pixels), generator=g).float() * 2 - 1
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(pixels, classifier.shape[1]))
    with torch.no_grad():
        encoder[1].weight.copy_(classifier.T @ patterns)
        encoder[1].bias.copy_(-encoder[1].weight.sum(1) * 0.5)
    images = (0.5 + 0.4 * patterns).view(k, 3, 4, 4)
    return encoder, images


def test_pgd_and_autoattack_through_the_zero_shot_classifier(tower):
    from pyautoattack import AutoAttack

    w = text_classifier(tower, CLASSES, templates=IMAGENET_TEMPLATES)
    encoder, x = _prototype_model(w, 48)
    y = torch.arange(len(CLASSES))
    model = nn.Sequential(encoder, ZeroShotHead(w, logit_scale=math.log(100.0))).eval()
    top1 = (model(x).argmax(1) == y).float().mean()
    assert top1 == 1.0

    x_adv = pgd(model, x, y, eps=0.45, step_size=0.1, steps=10, random_start=False)
    assert (cross_entropy(model(x_adv), y, reduction="none") > cross_entropy(model(x), y, reduction="none")).all()

    def autoattack(eps: float) -> float:
        adversary = AutoAttack(model, attacks=["apgd-ce"], eps=eps, norm="Linf", version="custom", seed=0)
        adversary.apgd.n_iter, adversary.apgd.n_restarts = 5, 1
        x_aa, _ = adversary.run_standard_evaluation(x, y, batch_size=len(CLASSES))
        assert (x_aa - x).abs().max() <= eps + 1e-6
        return float((model(x_aa).argmax(1) == y).float().mean())

    assert autoattack(1 / 255) == 1.0  # a margin this wide holds at a small radius
    assert autoattack(0.45) < 1.0  # and the attack reaches through the head at a large one
