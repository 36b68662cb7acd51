"""Keep-index samplers and masks: counts, ranges, the gather, prefix tokens, block contiguity, determinism."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from advtrain.tokens import (
    MaskedTokens,
    block_mask,
    block_shape,
    gather_tokens,
    num_kept,
    random_mask,
    sample_block_indices,
    sample_random_indices,
)

ratios = st.floats(0.0, 1.0, exclude_min=True)
seeds = st.integers(0, 2**31 - 1)


def index_valued(batch: int, n: int, dim: int) -> torch.Tensor:
    """``t[b, n, d] = 1000 b + n + d / 100``: every value names its own batch row, position and channel."""
    b = torch.arange(batch, dtype=torch.float64).view(-1, 1, 1)
    i = torch.arange(n, dtype=torch.float64).view(1, -1, 1)
    d = torch.arange(dim, dtype=torch.float64).view(1, 1, -1)
    return (1000 * b + i + d / 100).expand(batch, n, dim).contiguous()


def assert_valid_indices(idx: torch.Tensor, batch: int, n: int, k: int) -> None:
    assert idx.dtype == torch.int64 and idx.shape == (batch, k)
    if batch:
        assert int(idx.min()) >= 0 and int(idx.max()) < n
        assert bool((idx.diff(dim=1) > 0).all())  # strictly increasing: sorted and unique


# ----------------------------------------------------------------------------------------------------------------
# counts


@given(n=st.integers(1, 5000), r=ratios)
def test_num_kept_is_the_nearest_integer_and_at_least_one(n, r):
    k = num_kept(n, keep_ratio=r)
    assert 1 <= k <= n
    assert k == max(1, math.floor(r * n + 0.5))
    assert abs(k - r * n) <= 0.5 or k == 1


@pytest.mark.parametrize(
    ("n", "r", "k"),
    [(196, 0.5, 98), (196, 0.25, 49), (196, 1.0, 196), (7, 0.5, 4), (10, 0.01, 1), (49, 0.5, 25), (1, 0.3, 1)],
)
def test_num_kept_exact_counts(n, r, k):
    assert num_kept(n, keep_ratio=r) == k


@given(gh=st.integers(1, 40), gw=st.integers(1, 40), r=ratios)
def test_block_shape_fits_and_tracks_the_ratio(gh, gw, r):
    h, w = block_shape((gh, gw), keep_ratio=r)
    assert 1 <= h <= gh and 1 <= w <= gw
    assert h == min(gh, max(1, math.floor(gh * math.sqrt(r) + 0.5)))
    assert w == min(gw, max(1, math.floor(r * gh * gw / h + 0.5)))
    if w not in (1, gw):  # unclipped width: within half a row of the target area
        assert abs(h * w - r * gh * gw) <= h / 2 + 1e-9


@pytest.mark.parametrize(
    ("grid", "r", "shape"),
    [
        ((14, 14), 0.5, (10, 10)),
        ((14, 14), 0.25, (7, 7)),
        ((14, 14), 1.0, (14, 14)),
        ((7, 7), 0.5, (5, 5)),
        ((4, 8), 0.25, (2, 4)),
        ((1, 9), 0.5, (1, 5)),
        (3, 0.01, (1, 1)),
    ],
)
def test_block_shape_exact(grid, r, shape):
    assert block_shape(grid, keep_ratio=r) == shape


# ----------------------------------------------------------------------------------------------------------------
# random masks


@given(
    batch=st.integers(0, 5), n=st.integers(1, 80), prefix=st.integers(0, 3), dim=st.integers(1, 5), r=ratios, seed=seeds
)
def test_random_mask_counts_range_gather_and_prefix(batch, n, prefix, dim, r, seed):
    t = index_valued(batch, prefix + n, dim)
    out = random_mask(t, keep_ratio=r, num_prefix_tokens=prefix, generator=torch.Generator().manual_seed(seed))
    k = num_kept(n, keep_ratio=r)
    assert isinstance(out, MaskedTokens)
    assert_valid_indices(out.indices, batch, n, k)
    assert out.tokens.shape == (batch, prefix + k, dim) and out.tokens.dtype == t.dtype
    assert torch.equal(out.tokens[:, :prefix], t[:, :prefix])  # prefix tokens kept, first, in order
    # the token at kept slot j of row b is patch indices[b, j] of row b, every channel intact
    b = torch.arange(batch, dtype=torch.float64).view(-1, 1, 1)
    d = torch.arange(dim, dtype=torch.float64).view(1, 1, -1)
    expected = 1000 * b + (out.indices.double() + prefix).unsqueeze(-1) + d / 100
    assert torch.equal(out.tokens[:, prefix:], expected)
    # the same generator seed gives the same draw; sampling alone gives the same indices
    again = random_mask(t, keep_ratio=r, num_prefix_tokens=prefix, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(again.indices, out.indices) and torch.equal(again.tokens, out.tokens)
    alone = sample_random_indices(batch, n, keep_ratio=r, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(alone, out.indices)


def test_random_indices_are_uniform_and_rows_independent():
    n, r, batch = 10, 0.3, 6000
    idx = sample_random_indices(batch, n, keep_ratio=r, generator=torch.Generator().manual_seed(0))
    freq = torch.zeros(batch, n).scatter_(1, idx, 1.0).mean(0)  # P(patch kept) = K / N = 0.3 for every patch
    assert (freq - 0.3).abs().max() < 0.03, freq
    assert len({tuple(row) for row in idx.tolist()}) == math.comb(10, 3)  # every 3-subset shows up


def test_different_seeds_give_different_draws():
    a = sample_random_indices(4, 196, keep_ratio=0.5, generator=torch.Generator().manual_seed(0))
    b = sample_random_indices(4, 196, keep_ratio=0.5, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, b) and not torch.equal(a[0], a[1])


@pytest.mark.parametrize("mask", ["random", "block"])
def test_keep_ratio_one_is_the_identity(mask):
    t = torch.randn(3, 2 + 12, 5, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    if mask == "random":
        out = random_mask(t, keep_ratio=1.0, num_prefix_tokens=2, generator=g)
    else:
        out = block_mask(t, keep_ratio=1.0, grid=(3, 4), num_prefix_tokens=2, generator=g)
    assert torch.equal(out.tokens, t)
    assert torch.equal(out.indices, torch.arange(12).expand(3, 12))
    assert out.tokens is not t


# ----------------------------------------------------------------------------------------------------------------
# block masks


@given(
    batch=st.integers(0, 4),
    gh=st.integers(1, 16),
    gw=st.integers(1, 16),
    prefix=st.integers(0, 2),
    r=ratios,
    seed=seeds,
)
def test_block_mask_keeps_exactly_one_full_rectangle(batch, gh, gw, prefix, r, seed):
    t = index_valued(batch, prefix + gh * gw, 2)
    out = block_mask(
        t, keep_ratio=r, grid=(gh, gw), num_prefix_tokens=prefix, generator=torch.Generator().manual_seed(seed)
    )
    h, w = block_shape((gh, gw), keep_ratio=r)
    assert_valid_indices(out.indices, batch, gh * gw, h * w)
    assert torch.equal(out.tokens[:, :prefix], t[:, :prefix])
    assert torch.equal(out.tokens[:, prefix:, 0] % 1000, out.indices.double() + prefix)
    for row in out.indices.tolist():
        rows, cols = {i // gw for i in row}, {i % gw for i in row}
        top, left = min(rows), min(cols)
        assert rows == set(range(top, top + h)) and cols == set(range(left, left + w))
        assert set(row) == {(top + i) * gw + left + j for i in range(h) for j in range(w)}
    again = sample_block_indices(batch, grid=(gh, gw), keep_ratio=r, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(again, out.indices)


def test_block_placements_are_uniform():
    idx = sample_block_indices(4500, grid=(4, 4), keep_ratio=0.25, generator=torch.Generator().manual_seed(0))
    corners = idx[:, 0]  # the top-left patch: 9 placements of a 2 x 2 block on a 4 x 4 grid
    counts = torch.bincount(corners, minlength=16).double() / len(corners)
    placements = torch.tensor([0, 1, 2, 4, 5, 6, 8, 9, 10])
    assert (counts[placements] - 1 / 9).abs().max() < 0.02, counts
    assert counts.sum() - counts[placements].sum() == 0


# ----------------------------------------------------------------------------------------------------------------
# the gather on its own


@given(batch=st.integers(1, 4), n=st.integers(1, 30), prefix=st.integers(0, 2), seed=seeds, data=st.data())
def test_gather_follows_arbitrary_indices_in_their_order(batch, n, prefix, seed, data):
    k = data.draw(st.integers(1, n))
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (batch, k), generator=g)  # unsorted, repeats allowed
    t = index_valued(batch, prefix + n, 3)
    out = gather_tokens(t, idx, num_prefix_tokens=prefix)
    ref = torch.stack([torch.cat([t[b, :prefix], t[b, prefix:][idx[b]]]) for b in range(batch)])  # naive
    assert torch.equal(out, ref)


def test_gather_gradient_is_zero_on_dropped_tokens():
    t = torch.randn(2, 1 + 6, 3, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 4], [2, 3]])
    torch.autograd.gradcheck(lambda z: gather_tokens(z, idx, num_prefix_tokens=1), (t,))
    (grad,) = torch.autograd.grad(gather_tokens(t, idx, num_prefix_tokens=1).sum(), t)
    kept = torch.zeros(2, 7, dtype=torch.bool)
    kept[:, 0] = True
    kept[0, [1, 5]] = kept[1, [3, 4]] = True
    assert torch.equal(grad[..., 0] != 0, kept)


def test_inputs_are_not_mutated():
    t = torch.randn(2, 9, 4)
    before = t.clone()
    random_mask(t, keep_ratio=0.5, generator=torch.Generator().manual_seed(0))
    block_mask(t, keep_ratio=0.5, grid=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, before)


def test_indices_land_on_the_requested_device_and_dtype():
    idx = sample_random_indices(2, 8, keep_ratio=0.5, device="cpu")
    blk = sample_block_indices(2, grid=(2, 4), keep_ratio=0.5, device=torch.device("cpu"))
    assert idx.device.type == blk.device.type == "cpu" and idx.dtype == blk.dtype == torch.int64


# ----------------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    ("r", "err"),
    [
        (0.0, ValueError),
        (-0.1, ValueError),
        (1.5, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (True, TypeError),
        ("0.5", TypeError),
        (None, TypeError),
    ],
)
def test_bad_keep_ratio(r, err):
    t = torch.randn(1, 4, 2)
    for call in (
        lambda: random_mask(t, keep_ratio=r),
        lambda: block_mask(t, keep_ratio=r, grid=2),
        lambda: sample_random_indices(1, 4, keep_ratio=r),
        lambda: num_kept(4, keep_ratio=r),
        lambda: sample_block_indices(1, grid=2, keep_ratio=r),
        lambda: block_shape(2, keep_ratio=r),
    ):
        with pytest.raises(err, match="keep_ratio"):
            call()


def test_grid_must_match_the_patch_count():
    with pytest.raises(ValueError, match=r"grid \(3, 4\) has 12 patches .* hold 13 after 1 prefix"):
        block_mask(torch.randn(2, 14, 8), keep_ratio=0.5, grid=(3, 4), num_prefix_tokens=1)
    with pytest.raises(TypeError, match="grid"):
        block_mask(torch.randn(2, 12, 8), keep_ratio=0.5, grid=(3, 4, 1))
    with pytest.raises(ValueError, match="grid"):
        sample_block_indices(2, grid=(0, 4), keep_ratio=0.5)


def test_bad_tokens_and_indices():
    t = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"\(B, N, D\); got shape \(2, 5\)"):
        random_mask(t[..., 0], keep_ratio=0.5)
    with pytest.raises(TypeError, match="torch.Tensor"):
        random_mask(t.tolist(), keep_ratio=0.5)
    with pytest.raises(ValueError, match="no patch token after 5 prefix"):
        random_mask(t, keep_ratio=0.5, num_prefix_tokens=5)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        gather_tokens(t, torch.zeros(2, 1, dtype=torch.int64), num_prefix_tokens=-1)
    with pytest.raises(TypeError, match="int64; got dtype torch.int32"):
        gather_tokens(t, torch.zeros(2, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\(2, K\) with 1 <= K <= 4 .* got shape \(3, 1\)"):
        gather_tokens(t, torch.zeros(3, 1, dtype=torch.int64), num_prefix_tokens=1)
    with pytest.raises(ValueError, match=r"got shape \(2, 5\)"):
        gather_tokens(t, torch.zeros(2, 5, dtype=torch.int64), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="batch"):
        sample_random_indices(-1, 4, keep_ratio=0.5)
    with pytest.raises(TypeError, match="num_patches"):
        sample_random_indices(1, 4.0, keep_ratio=0.5)
