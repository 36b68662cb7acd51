"""resize_reduce: shapes, identity, a naive reference of the anti-aliased bilinear filter, range, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from advtrain.tokens import resize_reduce


def aa_bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` rows of a triangle filter stretched by ``s = n_in / n_out`` (PIL's bilinear reduce).

    Output pixel ``i`` is centred at ``c = s (i + 1/2)`` in input coordinates; input pixel ``j`` (centre
    ``j + 1/2``) gets weight ``max(0, 1 - |j + 1/2 - c| / s)``; the weights of a row sum to one.
    """
    s = n_in / n_out
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        c = s * (i + 0.5)
        for j in range(n_in):
            w[i, j] = max(0.0, 1 - abs(j + 0.5 - c) / s)
    return w / w.sum(1, keepdims=True)


@settings(max_examples=40)
@given(h=st.integers(1, 24), w=st.integers(1, 24), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_matches_a_naive_antialiased_bilinear_filter(h, w, data, seed):
    oh, ow = data.draw(st.integers(1, h)), data.draw(st.integers(1, w))
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref = np.einsum("oh,bchw,pw->bcop", aa_bilinear_weights(h, oh), x.numpy(), aa_bilinear_weights(w, ow))
    out = resize_reduce(x, (oh, ow))
    assert out.shape == (2, 3, oh, ow) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-10)


@given(seed=st.integers(0, 2**31 - 1), size=st.integers(1, 30))
def test_stays_inside_the_input_range(seed, size):
    # binary images: every output is a convex combination of 0s and 1s, and must stay in [0, 1] despite rounding
    x = (torch.rand(3, 3, 31, 31, generator=torch.Generator().manual_seed(seed)) > 0.5).float()
    out = resize_reduce(x, size)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_identity_at_the_inputs_own_size(dtype):
    x = torch.rand(2, 3, 12, 10).to(dtype)
    out = resize_reduce(x, (12, 10))
    assert torch.equal(out, x) and out is not x and out.dtype == dtype


def test_224_to_112_keeps_a_quarter_of_vit_b16s_patches():
    x = torch.rand(1, 3, 224, 224)
    out = resize_reduce(x, 112)
    assert out.shape == (1, 3, 112, 112)
    assert (out.shape[2] // 16) * (out.shape[3] // 16) / ((224 // 16) ** 2) == 0.25


def test_constant_images_stay_constant_and_halving_is_a_1331_filter():
    assert torch.equal(resize_reduce(torch.full((1, 1, 9, 7), 0.3), (4, 3)), torch.full((1, 1, 4, 3), 0.3))
    x = torch.zeros(1, 1, 1, 8, dtype=torch.float64)
    x[..., 3] = 1.0
    # halving: taps at distance 1/2 and 3/2 weigh 3/8 and 1/8 (the edges renormalize)
    assert torch.allclose(resize_reduce(x, (1, 4)).flatten(), torch.tensor([0, 3 / 8, 1 / 8, 0], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_resized_in_float32(dtype):
    x = torch.rand(2, 3, 32, 32)
    out = resize_reduce(x.to(dtype), 16)
    assert out.dtype == dtype
    assert torch.allclose(out.float(), resize_reduce(x.to(dtype).float(), 16), atol=1e-2)


@settings(max_examples=15)
@given(h=st.integers(1, 7), w=st.integers(1, 7), data=st.data())
def test_gradcheck(h, w, data):
    oh, ow = data.draw(st.integers(1, h)), data.draw(st.integers(1, w))
    x = torch.rand(1, 2, h, w, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: resize_reduce(z * 0.5 + 0.25, (oh, ow)), (x,))


def test_one_column_outputs_are_right():
    # torch 2.14's CPU antialiased kernel repeats the first row when the output is one column wide
    x = torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 3, 1)
    assert torch.allclose(resize_reduce(x, (2, 1)).flatten(), torch.tensor([1.375, 2.625]))
    assert torch.allclose(resize_reduce(x.expand(1, 1, 3, 4), (2, 1)).flatten(), torch.tensor([1.375, 2.625]))


def test_gradient_reaches_every_pixel_and_the_input_is_untouched():
    x = torch.rand(1, 2, 8, 8, requires_grad=True)
    before = x.detach().clone()
    (g,) = torch.autograd.grad(resize_reduce(x, 4).sum(), x)
    assert bool((g > 0).all()) and math.isclose(float(g.sum()), 2 * 4 * 4, rel_tol=1e-5)
    assert torch.equal(x.detach(), before)


def test_errors():
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) images; got shape \(3, 8, 8\)"):
        resize_reduce(x[0], 4)
    with pytest.raises(ValueError, match=r"size \(9, 8\) is larger than the input's \(8, 8\)"):
        resize_reduce(x, (9, 8))
    with pytest.raises(ValueError, match="larger"):
        resize_reduce(x, (4, 16))
    with pytest.raises(TypeError, match="floating"):
        resize_reduce((x * 255).to(torch.uint8), 4)
    with pytest.raises(TypeError, match="torch.Tensor"):
        resize_reduce(x.numpy(), 4)
    with pytest.raises(ValueError, match="size"):
        resize_reduce(x, 0)
    with pytest.raises(TypeError, match="size"):
        resize_reduce(x, 4.0)


def test_an_empty_batch():
    out = resize_reduce(torch.rand(0, 3, 8, 8), (4, 4))
    assert out.shape == (0, 3, 4, 4)
