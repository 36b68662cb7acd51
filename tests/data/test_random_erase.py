"""advtrain.data.random_erase and the training transform's ``erase`` option."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from advtrain.data import random_erase, train_transform


@given(seed=st.integers(0, 2**31 - 1), h=st.integers(8, 40), w=st.integers(8, 40), uint8=st.booleans())
def test_erases_one_box_of_in_range_noise_and_keeps_the_rest(seed, h, w, uint8):
    g = torch.Generator().manual_seed(seed)
    x = torch.full((3, h, w), 7, dtype=torch.uint8) if uint8 else torch.full((3, h, w), 0.5)
    y = random_erase(x, p=1.0, generator=g)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(x, torch.full_like(x, 7 if uint8 else 0.5))  # input untouched
    changed = (y != x).any(0)
    if changed.any():  # a box was placed: the changed pixels lie inside one rectangle within the area bounds
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        box_h, box_w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert box_h < h and box_w < w and box_h * box_w <= h * w / 3 + h + w
        box = y[:, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        outside = torch.ones(h, w, dtype=torch.bool)
        outside[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = False
        assert torch.equal(y[:, outside], x[:, outside])
        if not uint8:
            assert 0 <= float(box.min()) and float(box.max()) <= 1


def test_noise_is_uniform_over_the_pixel_range_and_p_is_the_erase_rate():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(3, 64, 64)
    outs = [random_erase(x, p=0.25, generator=g) for _ in range(800)]
    rate = sum(bool((o != x).any()) for o in outs) / len(outs)
    assert 0.2 < rate < 0.3  # a box fits on almost every try at 64 px
    vals = torch.cat([o[o != 0] for o in outs])
    assert 0.45 < float(vals.mean()) < 0.55 and float(vals.std()) == pytest.approx(12**-0.5, abs=0.02)  # U[0, 1]
    assert random_erase(x, p=0.0, generator=g) is x


def test_seeded_and_validated():
    x = torch.rand(3, 32, 32)
    a = random_erase(x, p=1.0, generator=torch.Generator().manual_seed(5))
    b = random_erase(x, p=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="p must be in"):
        random_erase(x, p=1.5, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"\(C, H, W\) image; got shape \(32, 32\)"):
        random_erase(x[0], p=1.0, generator=torch.Generator())
    with pytest.raises(ValueError, match="erase must be a probability"):
        train_transform(size=16, erase=-0.1)


def test_train_transform_erases_after_the_crop():
    img = Image.new("RGB", (48, 48), (200, 10, 10))
    plain = train_transform(size=32, hflip=0.0)
    erased = train_transform(size=32, hflip=0.0, erase=1.0)
    a = plain(img, torch.Generator().manual_seed(3))
    b = erased(img, torch.Generator().manual_seed(3))
    assert a.dtype == b.dtype == torch.uint8 and a.shape == b.shape == (3, 32, 32)
    assert torch.equal(a, torch.tensor((200, 10, 10), dtype=torch.uint8).view(3, 1, 1).expand(3, 32, 32))
    assert (b != a).any()  # a box of noise in an otherwise flat image
