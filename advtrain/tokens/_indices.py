"""Which patch tokens to keep: the counts, and the random and block samplers of keep-indices."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from advtrain.tokens import _checks


def _round_half_up(v: float) -> int:
    return math.floor(v + 0.5)


def num_kept(num_patches: int, *, keep_ratio: float) -> int:
    r"""The number of patch tokens a random mask keeps: :math:`K = \max(1, \lfloor rN + \tfrac12 \rfloor)`.

    The nearest integer to :math:`rN` (halves round up), and never zero. MAE and timm's ``PatchDropout``
    truncate instead (:math:`\lfloor rN \rfloor`); the two agree whenever :math:`rN` is an integer, e.g. for
    ViT-B/16 at 224 px (:math:`N = 196`): 98 tokens at :math:`r = 0.5`, 49 at :math:`r = 0.25`.

    Args:
        num_patches: :math:`N \ge 1`, the number of patch tokens (prefix tokens not counted).
        keep_ratio: :math:`r \in (0, 1]`, the fraction of patch tokens kept.

    Returns:
        :math:`K`, with :math:`1 \le K \le N`; :math:`K = N` at :math:`r = 1`.

    Raises:
        TypeError: a non-int ``num_patches`` or a non-numeric ``keep_ratio``.
        ValueError: ``num_patches < 1``; ``keep_ratio`` outside ``(0, 1]``.

    Example:
        >>> num_kept(196, keep_ratio=0.5), num_kept(196, keep_ratio=0.25), num_kept(10, keep_ratio=0.01)
        (98, 49, 1)

    References:
        He et al., "Masked Autoencoders Are Scalable Vision Learners", arXiv 2111.06377.
    """
    n = _checks.check_count(num_patches, "num_patches", minimum=1)
    r = _checks.check_keep_ratio(keep_ratio)
    return min(n, max(1, _round_half_up(r * n)))


def block_shape(grid: tuple[int, int], *, keep_ratio: float) -> tuple[int, int]:
    r"""The ``(h, w)`` rectangle of patches a block mask keeps on a ``(G_h, G_w)`` grid.

    The rectangle keeps the grid's aspect ratio and covers about :math:`r G_h G_w` patches:

    .. math::
        h = \mathrm{clip}(\lfloor G_h \sqrt{r} + \tfrac12 \rfloor, 1, G_h), \qquad
        w = \mathrm{clip}(\lfloor r G_h G_w / h + \tfrac12 \rfloor, 1, G_w).

    :math:`hw` can differ from :func:`num_kept`'s count (a 14 x 14 grid at :math:`r = 0.5` keeps 10 x 10 = 100
    patches, not 98); :math:`r = 1` keeps the whole grid and :math:`r = 0.25` on an even grid keeps exactly
    a quarter.

    Args:
        grid: ``(G_h, G_w)``, the patch grid (rows, columns); an int ``g`` means ``(g, g)``.
        keep_ratio: :math:`r \in (0, 1]`.

    Returns:
        ``(h, w)`` with ``1 <= h <= G_h`` and ``1 <= w <= G_w``.

    Raises:
        TypeError: a ``grid`` that is not an int or a pair of ints; a non-numeric ``keep_ratio``.
        ValueError: a grid side below 1; ``keep_ratio`` outside ``(0, 1]``.

    Example:
        >>> block_shape((14, 14), keep_ratio=0.5), block_shape((14, 14), keep_ratio=0.25)
        ((10, 10), (7, 7))
        >>> block_shape((4, 8), keep_ratio=1.0)
        (4, 8)

    References:
        Wang et al., "Revisiting Adversarial Training at Scale" (AdvXL, Table 1a), arXiv 2401.04727.
    """
    gh, gw = _checks.check_pair(grid, "grid")
    r = _checks.check_keep_ratio(keep_ratio)
    h = min(gh, max(1, _round_half_up(gh * math.sqrt(r))))
    w = min(gw, max(1, _round_half_up(r * gh * gw / h)))
    return h, w


def _sampling_device(generator: torch.Generator | None, device) -> tuple[torch.device, torch.device]:
    """(where to draw, where to put the result): the generator's device, then ``device`` (default: the same)."""
    draw = generator.device if generator is not None else torch.device(device if device is not None else "cpu")
    return draw, torch.device(device) if device is not None else draw


def sample_random_indices(
    batch: int,
    num_patches: int,
    *,
    keep_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""Samples, per sample, a uniformly random subset of :math:`K` of the :math:`N` patch indices.

    Row :math:`b` is the sorted first :math:`K` entries of a uniform random permutation of
    :math:`\{0, \dots, N-1\}` (the argsort of i.i.d. uniform noise, as in MAE), so every :math:`K`-subset is
    equally likely and rows are independent. :math:`K` is :func:`num_kept`. Sampling is separate from
    applying, so one draw can serve an attack and the training step that follows (same tokens in both).

    Args:
        batch: :math:`B \ge 0`.
        num_patches: :math:`N \ge 1` patch tokens (prefix tokens not counted).
        keep_ratio: :math:`r \in (0, 1]`.
        generator: the source of randomness; the noise is drawn on its device.
        device: where the indices go; default: the generator's device, else the CPU.

    Returns:
        ``(B, K)`` int64 indices into the patch tokens, strictly increasing along each row.

    Raises:
        TypeError: non-int ``batch`` or ``num_patches``; a non-numeric ``keep_ratio``.
        ValueError: ``batch < 0``; ``num_patches < 1``; ``keep_ratio`` outside ``(0, 1]``.

    Example:
        >>> import torch
        >>> idx = sample_random_indices(2, 16, keep_ratio=0.25, generator=torch.Generator().manual_seed(0))
        >>> idx.shape, idx.dtype, bool((idx.diff(dim=1) > 0).all())
        (torch.Size([2, 4]), torch.int64, True)

    References:
        He et al., "Masked Autoencoders Are Scalable Vision Learners", arXiv 2111.06377.
        Li et al., "Scaling Language-Image Pre-training via Masking" (FLIP), arXiv 2212.00794.
    """
    b = _checks.check_count(batch, "batch", minimum=0)
    k = num_kept(num_patches, keep_ratio=keep_ratio)
    draw, out = _sampling_device(generator, device)
    noise = torch.rand((b, num_patches), generator=generator, device=draw)
    keep = noise.argsort(dim=1)[:, :k]
    return keep.sort(dim=1).values.to(out)


def sample_block_indices(
    batch: int,
    *,
    grid: tuple[int, int],
    keep_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""Samples, per sample, one contiguous ``h x w`` rectangle of a ``(G_h, G_w)`` patch grid.

    The rectangle's shape is :func:`block_shape`; its top-left corner :math:`(t, l)` is uniform over the
    :math:`(G_h - h + 1)(G_w - w + 1)` placements that fit. Patches are numbered row-major (index
    :math:`i G_w + j` for row :math:`i`, column :math:`j`, as a ViT flattens its grid), so row :math:`b` is
    :math:`\{(t + i) G_w + l + j : 0 \le i < h, 0 \le j < w\}` in increasing order.

    Args:
        batch: :math:`B \ge 0`.
        grid: ``(G_h, G_w)``, the patch grid; an int ``g`` means ``(g, g)``.
        keep_ratio: :math:`r \in (0, 1]`.
        generator: the source of randomness; the corners are drawn on its device.
        device: where the indices go; default: the generator's device, else the CPU.

    Returns:
        ``(B, h * w)`` int64 indices into the ``G_h * G_w`` patch tokens, increasing along each row.

    Raises:
        TypeError: a non-int ``batch``; a bad ``grid``; a non-numeric ``keep_ratio``.
        ValueError: ``batch < 0``; a grid side below 1; ``keep_ratio`` outside ``(0, 1]``.

    Example:
        >>> import torch
        >>> sample_block_indices(1, grid=(4, 4), keep_ratio=0.25, generator=torch.Generator().manual_seed(0))
        tensor([[ 8,  9, 12, 13]])

    References:
        Wang et al., "Revisiting Adversarial Training at Scale" (AdvXL, Table 1a), arXiv 2401.04727.
    """
    b = _checks.check_count(batch, "batch", minimum=0)
    gh, gw = _checks.check_pair(grid, "grid")
    h, w = block_shape((gh, gw), keep_ratio=keep_ratio)
    draw, out = _sampling_device(generator, device)
    top = torch.randint(0, gh - h + 1, (b, 1, 1), generator=generator, device=draw)
    left = torch.randint(0, gw - w + 1, (b, 1, 1), generator=generator, device=draw)
    rows = torch.arange(h, device=draw).view(1, h, 1)
    cols = torch.arange(w, device=draw).view(1, 1, w)
    return ((top + rows) * gw + left + cols).reshape(b, h * w).to(out)
