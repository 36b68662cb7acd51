"""The frozen text tower: frozen for good, chosen by open_clip name, and the cached, batched caption embedder."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from torch import nn

from advtrain.losses import (
    ClipContrastiveLoss,
    FrozenTextTower,
    TextCache,
    embed_texts,
    load_text_tower,
    tiny_text_tower,
)

BATCHING_TOL = {"rtol": 1e-4, "atol": 1e-5}  # batch composition changes float reduction order in the tower
CAPTIONS = [f"a photo of a {c}." for c in ["cat", "dog", "ship", "frog", "truck", "bird", "deer"]]


class Counting(nn.Module):
    """Wraps an encoder and records how many captions it has encoded."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.rows: list[int] = []

    def forward(self, tokens):
        self.rows.append(tokens.shape[0])
        return self.encoder(tokens)


def _counting_tower(tower: FrozenTextTower) -> tuple[FrozenTextTower, Counting]:
    counting = Counting(tower.encoder)
    wrapped = FrozenTextTower(counting, tower.tokenizer)
    counting.rows.clear()  # forget the probe that read the feature dimension
    return wrapped, counting


# ------------------------------------------------------------------------------------------------------------
# Frozen


def test_tower_is_frozen_and_stays_in_eval_mode(tower):
    assert all(not p.requires_grad for p in tower.parameters())
    assert not tower.training and not any(m.training for m in tower.modules())
    tower.train()
    assert not any(m.training for m in tower.modules())
    parent = nn.ModuleDict({"tower": tower, "head": nn.Linear(2, 2)})
    parent.train()  # a parent switching to train mode cannot switch the tower
    assert parent["head"].training and not any(m.training for m in tower.modules())


def test_outputs_carry_no_graph_even_if_the_parameters_are_unfrozen():
    tower = tiny_text_tower(seed=3)
    for p in tower.parameters():
        p.requires_grad_(True)
    with torch.enable_grad():
        out = tower(tower.tokenize(CAPTIONS))
        g = embed_texts(tower, CAPTIONS)
    assert out.grad_fn is None and not out.requires_grad
    assert g.grad_fn is None and not g.requires_grad


def test_no_gradient_reaches_the_text_tower(tower):
    """A training step of an image model against the tower's features: only the image side gets gradients."""
    image_model = nn.Sequential(nn.Flatten(), nn.Linear(12, tower.embed_dim))
    loss_module = ClipContrastiveLoss()
    x = torch.rand(len(CAPTIONS), 3, 2, 2, generator=torch.Generator().manual_seed(0))
    for p in tower.parameters():
        p.grad = None
    text = embed_texts(tower, CAPTIONS)
    loss_module(image_model(x), text).backward()
    assert all(p.grad is None for p in tower.parameters())
    assert all(p.grad is not None for p in image_model.parameters())
    assert loss_module.logit_scale.grad is not None


# ------------------------------------------------------------------------------------------------------------
# The embedder


def test_embed_texts_is_the_normalized_tower_output_in_order(tower):
    g = embed_texts(tower, CAPTIONS)
    assert g.shape == (len(CAPTIONS), tower.embed_dim) and g.dtype == torch.float32
    torch.testing.assert_close(g.norm(dim=1), torch.ones(len(CAPTIONS)))
    direct = nn.functional.normalize(tower(tower.tokenize(CAPTIONS)), dim=1)
    torch.testing.assert_close(g, direct)
    torch.testing.assert_close(embed_texts(tower, CAPTIONS[::-1]), g.flip(0), **BATCHING_TOL)
    assert not torch.allclose(g[0], g[1])  # different captions, different features


@pytest.mark.parametrize("batch_size", [1, 3, 100])
def test_batching_does_not_change_the_features(tower, batch_size):
    torch.testing.assert_close(
        embed_texts(tower, CAPTIONS, batch_size=batch_size), embed_texts(tower, CAPTIONS), **BATCHING_TOL
    )


def test_each_distinct_caption_is_encoded_once(tower):
    wrapped, counting = _counting_tower(tower)
    texts = CAPTIONS[:3] * 5  # 15 captions, 3 distinct
    g = embed_texts(wrapped, texts, batch_size=2)
    assert counting.rows == [2, 1]
    torch.testing.assert_close(g, embed_texts(tower, texts), **BATCHING_TOL)


def test_cache_embeds_repeated_captions_once_across_calls(tower):
    wrapped, counting = _counting_tower(tower)
    cache = TextCache()
    first = embed_texts(wrapped, CAPTIONS[:4], cache=cache)
    assert sum(counting.rows) == 4 and len(cache) == 4
    second = embed_texts(wrapped, CAPTIONS[2:6] + CAPTIONS[:1], cache=cache)
    assert sum(counting.rows) == 6  # only CAPTIONS[4] and CAPTIONS[5] were new
    torch.testing.assert_close(second[:2], first[2:4])
    torch.testing.assert_close(second[4], first[0])
    plain = {}  # any mutable mapping works
    embed_texts(wrapped, CAPTIONS[:2], cache=plain)
    assert set(plain) == set(CAPTIONS[:2])


def test_bounded_cache_evicts_least_recently_used_and_stays_correct(tower):
    cache = TextCache(max_entries=2)
    embed_texts(tower, CAPTIONS[:2], cache=cache)
    embed_texts(tower, CAPTIONS[:1], cache=cache)  # touch CAPTIONS[0]
    embed_texts(tower, CAPTIONS[2:3], cache=cache)  # evicts CAPTIONS[1]
    assert list(cache) == [CAPTIONS[0], CAPTIONS[2]]
    tiny = TextCache(max_entries=1)  # smaller than one call's distinct captions: results are still right
    fresh = embed_texts(tower, CAPTIONS)
    for _ in range(2):
        torch.testing.assert_close(embed_texts(tower, CAPTIONS, cache=tiny), fresh, **BATCHING_TOL)


def test_empty_input(tower):
    assert embed_texts(tower, []).shape == (0, tower.embed_dim)


@pytest.mark.parametrize(
    ("texts", "kw", "error"),
    [
        ("a photo of a cat.", {}, TypeError),  # a str is a sequence of characters: refuse it
        (["a", 3], {}, TypeError),
        (CAPTIONS, {"batch_size": 0}, ValueError),
        (CAPTIONS, {"batch_size": 2.0}, ValueError),
    ],
)
def test_embed_texts_bad_input_raises(tower, texts, kw, error):
    with pytest.raises(error):
        embed_texts(tower, texts, **kw)


def test_embed_texts_needs_a_frozen_tower(tower):
    with pytest.raises(TypeError):
        embed_texts(tower.encoder, CAPTIONS)
    with pytest.raises(ValueError):
        TextCache(max_entries=0)


# ------------------------------------------------------------------------------------------------------------
# Construction


def test_tiny_tower_is_seeded_locally():
    state = torch.get_rng_state()
    small = {"width": 16, "heads": 4, "embed_dim": 8}
    a, b, c = tiny_text_tower(seed=1, **small), tiny_text_tower(seed=1, **small), tiny_text_tower(seed=2, **small)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left alone
    tokens = a.tokenize(CAPTIONS)
    assert torch.equal(a(tokens), b(tokens)) and not torch.allclose(a(tokens), c(tokens))
    assert a.embed_dim == 8


def test_tiny_tower_keeps_template_captions_apart():
    """Captions that differ in one word get clearly different features (open_clip's init makes them collinear)."""
    digits = [f"a photo of a {i}." for i in range(10)]
    for kw, bound in [({}, 0.95), ({"attention_gain": 1.0}, None)]:
        g = embed_texts(tiny_text_tower(**kw), digits)
        cos = (g @ g.T)[~torch.eye(10, dtype=torch.bool)]
        if bound is not None:
            assert cos.max() < bound
        else:
            assert cos.mean() > 0.9  # the reason for the gain: untrained CLIP init averages the template


@pytest.mark.parametrize("kw", [{"embed_dim": 0}, {"width": 30, "heads": 4}, {"layers": 1.5}, {"attention_gain": 0.0}])
def test_tiny_tower_bad_sizes_raise(kw):
    with pytest.raises(ValueError):
        tiny_text_tower(**kw)


def test_load_text_tower_by_open_clip_name(tmp_path):
    """A tiny config registered under a name goes through open_clip's factory, offline, without its image tower."""
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 8, "layers": 1, "width": 8, "head_width": 8, "patch_size": 4},
        "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    }
    path = tmp_path / "advtrain-test-tiny-text.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    tower = load_text_tower("advtrain-test-tiny-text")
    assert isinstance(tower, FrozenTextTower) and tower.embed_dim == 16
    assert not any(k.startswith(("visual", "encoder.visual")) for k in tower.state_dict())
    assert all(not p.requires_grad for p in tower.parameters()) and not tower.training
    tokens = tower.tokenize(CAPTIONS)
    assert tokens.shape == (len(CAPTIONS), 12)
    g = embed_texts(tower, CAPTIONS)
    assert g.shape == (len(CAPTIONS), 16)
    with pytest.raises(TypeError):
        load_text_tower(None)


def test_frozen_tower_checks_its_parts(tower):
    with pytest.raises(TypeError):
        FrozenTextTower(lambda tokens: tokens, tower.tokenizer)
    with pytest.raises(TypeError):
        FrozenTextTower(tower.encoder, "not a tokenizer")
    with pytest.raises(ValueError):
        FrozenTextTower(nn.Identity(), lambda texts: torch.zeros(len(texts), 3, 4))  # (N, L, D): not pooled
