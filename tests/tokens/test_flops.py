"""Compute really falls: FLOPs of ViT-B/16 (timm, random init) at 224 px under each reducer, counted by torch.

The counts are checked against a closed form, then their ratios to the full forward against the issue's bounds.
Fused attention is switched off so that ``FlopCounterMode`` sees (and counts) the attention matmuls; the CPU
flash-attention kernel has no FLOP formula in torch and would hide the quadratic term.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from advtrain.tokens import (
    resample_vit_,
    resize_reduce,
    sample_block_indices,
    sample_random_indices,
    vit_forward_tokens,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

D, DEPTH, PATCH, CLASSES = 768, 12, 16, 1000


def vit_b16_flops(img: int, kept: int | None = None) -> int:
    """Forward FLOPs (2 per multiply-add) of ViT-B/16 with a CLS token and ``kept`` of its patch tokens."""
    n = (img // PATCH) ** 2
    t = 1 + (n if kept is None else kept)
    patch_embed = n * D * 3 * PATCH * PATCH
    block = t * D * (3 * D + D + 4 * D + 4 * D) + 2 * t * t * D  # qkv, proj, fc1, fc2; q k^T and attn v
    return 2 * (patch_embed + DEPTH * block + D * CLASSES)


def count(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def vit_b16(one_thread):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    for block in model.blocks:
        block.attn.fused_attn = False
    return model


@pytest.fixture(scope="module")
def full_flops(vit_b16):
    flops = count(lambda: vit_b16(torch.rand(1, 3, 224, 224)))
    assert flops == vit_b16_flops(224)  # about 35.1 GFLOPs (17.6 G multiply-adds)
    return flops


@pytest.mark.parametrize(
    ("mask", "keep_ratio", "kept", "bound"),
    [("random", 0.5, 98, 0.55), ("random", 0.25, 49, 0.30), ("block", 0.5, 100, 0.55), ("block", 0.25, 49, 0.30)],
)
def test_masks_cut_flops(vit_b16, full_flops, mask, keep_ratio, kept, bound):
    g = torch.Generator().manual_seed(0)
    if mask == "random":
        idx = sample_random_indices(1, 196, keep_ratio=keep_ratio, generator=g)
    else:
        idx = sample_block_indices(1, grid=(14, 14), keep_ratio=keep_ratio, generator=g)
    assert idx.shape == (1, kept)
    flops = count(lambda: vit_forward_tokens(vit_b16, torch.rand(1, 3, 224, 224), indices=idx))
    assert flops == vit_b16_flops(224, kept)
    ratio = flops / full_flops
    print(f"{mask} mask, keep {keep_ratio:.0%}: {flops / 1e9:.2f} GFLOPs = {ratio:.3f}x of the full forward")
    assert ratio <= bound


@pytest.mark.parametrize(("size", "bound"), [(112, 0.27), (160, 0.55)])
def test_resizing_cuts_flops(vit_b16, full_flops, size, bound):
    small = resample_vit_(copy.deepcopy(vit_b16), img_size=size)  # the same weights, run at `size` px
    x = resize_reduce(torch.rand(1, 3, 224, 224), size)
    flops = count(lambda: vit_forward_tokens(small, x))
    assert flops == vit_b16_flops(size)
    ratio = flops / full_flops
    print(f"resize 224 -> {size} px: {flops / 1e9:.2f} GFLOPs = {ratio:.3f}x of the full forward")
    assert ratio <= bound
