"""vit_forward_tokens and resample_vit_ on tiny timm ViTs of every token layout; composition with pgd."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.models.vision_transformer import VisionTransformer

from advtrain import cross_entropy, pgd
from advtrain.tokens import (
    gather_tokens,
    resample_vit_,
    resize_reduce,
    sample_block_indices,
    sample_random_indices,
    vit_forward_tokens,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# every way a timm ViT lays out its prefix tokens, position embedding and pooling
LAYOUTS = {
    "cls": {},
    "cls+reg, no_embed_class": {"reg_tokens": 2, "no_embed_class": True},
    "cls+reg, embed_class": {"reg_tokens": 3},
    "avg pool, no prefix": {"class_token": False, "global_pool": "avg"},
    "pre_norm, map pool": {"pre_norm": True, "global_pool": "map"},
    "no pos_embed": {"pos_embed": "none", "global_pool": "avg", "reg_tokens": 1},
    "dynamic": {"dynamic_img_size": True},
    "dynamic, no_embed_class": {"dynamic_img_size": True, "no_embed_class": True, "reg_tokens": 1},
}


def tiny_vit(img_size=32, *, seed=0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=img_size, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, **kw)
    with torch.no_grad():  # timm zero-inits some tokens; random values make every token and embedding count
        for name, p in model.named_parameters():
            if name.endswith(("cls_token", "reg_token", "pos_embed")):
                p.normal_(0, 1)
    return model.eval()


def reference_forward(model: VisionTransformer, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """timm's own embedding (``_pos_embed``) on every token, then the gather, then the rest of the model."""
    h = model._pos_embed(model.patch_embed(x))
    h = gather_tokens(h, indices, num_prefix_tokens=model.num_prefix_tokens)
    h = model.norm(model.blocks(model.norm_pre(model.patch_drop(h))))
    return model.forward_head(h)


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def layout(request):
    return request.param, tiny_vit(**LAYOUTS[request.param])


def test_with_every_token_it_equals_the_models_forward(layout):
    name, model = layout
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(x)
        assert torch.equal(vit_forward_tokens(model, x), full), name
        every = vit_forward_tokens(model, x, indices=torch.arange(16).expand(3, 16))
        if model.num_prefix_tokens:
            assert torch.equal(every, full), name
        else:  # timm's tokens stay a transposed view; the gather makes them contiguous: same sums, new order
            torch.testing.assert_close(every, full, rtol=1e-6, atol=1e-6, msg=name)


@settings(max_examples=6)
@given(seed=st.integers(0, 2**31 - 1), r=st.floats(0.05, 1.0), block=st.booleans())
def test_reduced_forward_matches_timms_embedding_then_gather(layout, seed, r, block):
    name, model = layout
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, 32, 32, generator=g)
    if block:
        idx = sample_block_indices(2, grid=(4, 4), keep_ratio=r, generator=g)
    else:
        idx = sample_random_indices(2, 16, keep_ratio=r, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(
            vit_forward_tokens(model, x, indices=idx), reference_forward(model, x, idx), rtol=1e-5, atol=1e-5, msg=name
        )


def test_only_the_kept_patches_reach_the_output():
    model = tiny_vit()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g, requires_grad=True)
    idx = torch.tensor([[0, 5, 10, 15], [1, 2, 3, 12]])
    (grad,) = torch.autograd.grad(vit_forward_tokens(model, x, indices=idx).square().sum(), x)
    kept = torch.zeros(2, 16, dtype=torch.bool).scatter_(1, idx, True).view(2, 1, 4, 4)
    kept_pixels = kept.repeat_interleave(8, 2).repeat_interleave(8, 3).expand_as(x)  # 8 x 8 px patches
    assert bool((grad[~kept_pixels] == 0).all())
    assert bool((grad.abs().flatten(2).sum(1).view(2, 32, 32)[kept_pixels[:, 0]] > 0).all())
    with torch.no_grad():  # rewriting every dropped patch changes nothing
        noisy = torch.where(kept_pixels, x, torch.rand(x.shape, generator=g))
        assert torch.equal(vit_forward_tokens(model, noisy, indices=idx), vit_forward_tokens(model, x, indices=idx))


def test_the_same_indices_give_the_same_output_and_the_model_is_left_as_found():
    model = tiny_vit(reg_tokens=1).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 3, 32, 32)
    idx = sample_random_indices(2, 16, keep_ratio=0.5, generator=torch.Generator().manual_seed(3))
    a, b = vit_forward_tokens(model, x, indices=idx), vit_forward_tokens(model, x, indices=idx)
    assert torch.equal(a, b) and model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_dynamic_models_run_at_any_multiple_of_the_patch_size():
    model = tiny_vit(dynamic_img_size=True)
    x = torch.rand(2, 3, 48, 24)  # a 6 x 3 grid
    idx = sample_block_indices(2, grid=(6, 3), keep_ratio=0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert vit_forward_tokens(model, x, indices=idx).shape == (2, 5)
        assert torch.equal(vit_forward_tokens(model, x), model(x))
        small = resize_reduce(torch.rand(2, 3, 32, 32), 16)  # resize as a reducer: 2 x 2 = 4 tokens of 16
        assert torch.equal(vit_forward_tokens(model, small), model(small))


def test_gradient_checkpointing_gives_the_same_result():
    model = tiny_vit()
    x = torch.rand(2, 3, 32, 32)
    idx = sample_random_indices(2, 16, keep_ratio=0.5, generator=torch.Generator().manual_seed(0))
    plain = vit_forward_tokens(model, x, indices=idx)
    model.set_grad_checkpointing(True)
    assert torch.allclose(vit_forward_tokens(model, x, indices=idx), plain)


def test_errors():
    model = tiny_vit()
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(TypeError, match="VisionTransformer"):
        vit_forward_tokens(torch.nn.Identity(), x)
    with pytest.raises(ValueError, match=r"img_size \(32, 32\); got x of shape \(2, 3, 64, 64\).*resample_vit_"):
        vit_forward_tokens(model, torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        vit_forward_tokens(model, x[0])
    with pytest.raises(TypeError, match="int64"):
        vit_forward_tokens(model, x, indices=torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"1 <= K <= 16 .* got shape \(2, 17\)"):
        vit_forward_tokens(model, x, indices=torch.zeros(2, 17, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\(2, K\)"):
        vit_forward_tokens(model, x, indices=torch.zeros(1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        resample_vit_(model, img_size=36)
    with pytest.raises(TypeError, match="VisionTransformer"):
        resample_vit_(torch.nn.Linear(2, 2), img_size=32)


# ----------------------------------------------------------------------------------------------------------------
# resampling: coarse to fine


@pytest.mark.parametrize("kw", [{}, {"reg_tokens": 2, "no_embed_class": True}])
def test_resample_112_to_224_to_336(kw):
    model = tiny_vit(112, **kw)
    assert model.pos_embed.shape[1] == 14 * 14 + (0 if kw else 1)
    for size in (224, 336):
        param = resample_vit_(model, img_size=size).pos_embed
        grid = size // 8
        assert param.shape == (1, grid * grid + (0 if kw else 1), 32) and param.requires_grad
        assert tuple(model.patch_embed.grid_size) == (grid, grid)
        x = torch.rand(1, 3, size, size)
        idx = sample_random_indices(1, grid * grid, keep_ratio=0.25, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert model(x).shape == vit_forward_tokens(model, x, indices=idx).shape == (1, 5)
            assert torch.equal(vit_forward_tokens(model, x), model(x))


def test_resample_keeps_prefix_entries_and_interpolates_a_constant_grid_exactly():
    model = tiny_vit(112)
    with torch.no_grad():
        model.pos_embed[:, 1:] = torch.linspace(-1, 1, 32)  # every patch position gets the same vector
    cls = model.pos_embed[:, :1].detach().clone()
    resample_vit_(model, img_size=(224, 168))
    assert model.pos_embed.shape == (1, 1 + 28 * 21, 32)
    assert torch.equal(model.pos_embed[:, :1], cls)
    assert torch.allclose(model.pos_embed[:, 1:], torch.linspace(-1, 1, 32).expand(1, 28 * 21, 32), atol=1e-6)


def test_resample_at_the_current_size_is_the_identity():
    model = tiny_vit(32)
    param, values = model.pos_embed, model.pos_embed.detach().clone()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    assert resample_vit_(model, img_size=(32, 32)) is model
    assert model.pos_embed is param and torch.equal(model.pos_embed, values)
    with torch.no_grad():
        assert torch.equal(model(x), before)


# ----------------------------------------------------------------------------------------------------------------
# attacks on the reduced model


def test_pgd_through_the_reduced_forward_perturbs_only_kept_patches_and_raises_the_loss():
    model = tiny_vit()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g)
    idx = sample_random_indices(4, 16, keep_ratio=0.5, generator=g)  # once per batch: attack and step share it
    reduced = functools.partial(vit_forward_tokens, model, indices=idx)
    x_adv = pgd(reduced, x, y, eps=8 / 255, step_size=2 / 255, steps=5, random_start=False)
    kept = torch.zeros(4, 16, dtype=torch.bool).scatter_(1, idx, True).view(4, 1, 4, 4)
    kept = kept.repeat_interleave(8, 2).repeat_interleave(8, 3).expand_as(x)
    assert torch.equal(x_adv[~kept], x[~kept])  # a dropped patch has no gradient, so it never moves
    assert bool((x_adv[kept] != x[kept]).any())
    with torch.no_grad():
        clean = cross_entropy(reduced(x), y)
        adv = cross_entropy(reduced(x_adv), y)
    assert float(adv) > float(clean)
