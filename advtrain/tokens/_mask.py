"""Applying keep-indices to token sequences: the gather, and the random and block masks built on it."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from advtrain.tokens import _checks
from advtrain.tokens._indices import sample_block_indices, sample_random_indices


class MaskedTokens(NamedTuple):
    """The kept tokens and the indices that chose them.

    Attributes:
        tokens: ``(B, P + K, D)``: the ``P`` prefix tokens, then the ``K`` kept patch tokens in index order.
        indices: ``(B, K)`` int64 indices into the patch tokens (prefix tokens not counted).
    """

    tokens: Tensor
    indices: Tensor


def gather_tokens(tokens: Tensor, indices: Tensor, *, num_prefix_tokens: int = 0) -> Tensor:
    r"""Keeps the prefix tokens and the patch tokens at ``indices``, in the order of ``indices``.

    With prefix :math:`t_{b,0..P-1}` and patches :math:`u_{b,n} = t_{b,P+n}`, the output is
    :math:`[t_{b,0}, \dots, t_{b,P-1}, u_{b,i_{b,1}}, \dots, u_{b,i_{b,K}}]`. Differentiable in ``tokens``
    (the gradient of a dropped token is zero).

    Args:
        tokens: ``(B, P + N, D)``: ``P`` prefix tokens (CLS, registers), then ``N >= 1`` patch tokens.
        indices: ``(B, K)`` int64 indices into the ``N`` patch tokens, ``1 <= K <= N``, on ``tokens``'
            device. Their values are not checked (that would synchronize a GPU); ``torch.gather`` raises on
            the CPU for an index out of ``[0, N)``.
        num_prefix_tokens: ``P >= 0``, the leading tokens that are always kept.

    Returns:
        ``(B, P + K, D)`` tokens of ``tokens``' dtype and device.

    Raises:
        TypeError: a non-tensor input; ``indices`` not int64.
        ValueError: ``tokens`` not 3-D or without a patch token; ``indices`` not ``(B, K)`` with
            ``1 <= K <= N``.

    Example:
        >>> import torch
        >>> t = torch.arange(5.0).view(1, 5, 1)  # a CLS token, then 4 patches
        >>> gather_tokens(t, torch.tensor([[0, 3]]), num_prefix_tokens=1).flatten().tolist()
        [0.0, 1.0, 4.0]

    References:
        He et al., "Masked Autoencoders Are Scalable Vision Learners", arXiv 2111.06377.
    """
    p = _checks.check_tokens(tokens, num_prefix_tokens)
    _checks.check_indices(indices, tokens.shape[0], tokens.shape[1] - p)
    patches = tokens[:, p:]
    kept = patches.gather(1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[2]))
    return torch.cat([tokens[:, :p], kept], dim=1)


def random_mask(
    tokens: Tensor, *, keep_ratio: float, num_prefix_tokens: int = 0, generator: torch.Generator | None = None
) -> MaskedTokens:
    r"""Keeps a uniformly random subset of :math:`K = \max(1, \lfloor rN + \tfrac12 \rfloor)` patch tokens.

    :func:`sample_random_indices` then :func:`gather_tokens`; the prefix tokens are always kept. To apply the
    same subset twice (an attack, then the training step), sample the indices once and call
    :func:`gather_tokens` or :func:`~advtrain.tokens.vit_forward_tokens` with them.

    Args:
        tokens: ``(B, P + N, D)`` tokens.
        keep_ratio: :math:`r \in (0, 1]`, the fraction of patch tokens kept.
        num_prefix_tokens: ``P >= 0``.
        generator: the source of randomness.

    Returns:
        :class:`MaskedTokens`: ``(B, P + K, D)`` tokens and their ``(B, K)`` increasing int64 indices.

    Raises:
        TypeError, ValueError: as :func:`gather_tokens` and :func:`sample_random_indices`.

    Example:
        >>> import torch
        >>> t = torch.randn(2, 1 + 196, 8)
        >>> out = random_mask(t, keep_ratio=0.5, num_prefix_tokens=1, generator=torch.Generator().manual_seed(0))
        >>> out.tokens.shape, out.indices.shape, torch.equal(out.tokens[:, 0], t[:, 0])
        (torch.Size([2, 99, 8]), torch.Size([2, 98]), True)

    References:
        Li et al., "Scaling Language-Image Pre-training via Masking" (FLIP), arXiv 2212.00794.
        Wang et al., "Revisiting Adversarial Training at Scale" (AdvXL), arXiv 2401.04727.
    """
    p = _checks.check_tokens(tokens, num_prefix_tokens)
    indices = sample_random_indices(
        tokens.shape[0], tokens.shape[1] - p, keep_ratio=keep_ratio, generator=generator, device=tokens.device
    )
    return MaskedTokens(gather_tokens(tokens, indices, num_prefix_tokens=p), indices)


def block_mask(
    tokens: Tensor,
    *,
    keep_ratio: float,
    grid: tuple[int, int],
    num_prefix_tokens: int = 0,
    generator: torch.Generator | None = None,
) -> MaskedTokens:
    r"""Keeps one random contiguous ``h x w`` rectangle of the patch grid (see :func:`block_shape`).

    :func:`sample_block_indices` then :func:`gather_tokens`; the prefix tokens are always kept. The patch
    tokens are the row-major flattening of a ``(G_h, G_w)`` grid, so :math:`N = G_h G_w`.

    Args:
        tokens: ``(B, P + G_h G_w, D)`` tokens.
        keep_ratio: :math:`r \in (0, 1]`, the target fraction of patch tokens kept.
        grid: ``(G_h, G_w)``; an int ``g`` means ``(g, g)``.
        num_prefix_tokens: ``P >= 0``.
        generator: the source of randomness.

    Returns:
        :class:`MaskedTokens`: ``(B, P + h w, D)`` tokens and their ``(B, h w)`` increasing int64 indices.

    Raises:
        TypeError, ValueError: as :func:`gather_tokens` and :func:`sample_block_indices`; ValueError when
        :math:`G_h G_w` is not the number of patch tokens.

    Example:
        >>> import torch
        >>> t = torch.randn(2, 1 + 14 * 14, 8)
        >>> g = torch.Generator().manual_seed(0)
        >>> out = block_mask(t, keep_ratio=0.25, grid=(14, 14), num_prefix_tokens=1, generator=g)
        >>> out.tokens.shape, out.indices.shape
        (torch.Size([2, 50, 8]), torch.Size([2, 49]))

    References:
        Wang et al., "Revisiting Adversarial Training at Scale" (AdvXL, Table 1a), arXiv 2401.04727.
    """
    p = _checks.check_tokens(tokens, num_prefix_tokens)
    gh, gw = _checks.check_pair(grid, "grid")
    if gh * gw != tokens.shape[1] - p:
        raise ValueError(
            f"grid {(gh, gw)} has {gh * gw} patches but tokens of shape {tuple(tokens.shape)} hold "
            f"{tokens.shape[1] - p} after {p} prefix tokens"
        )
    indices = sample_block_indices(
        tokens.shape[0], grid=(gh, gw), keep_ratio=keep_ratio, generator=generator, device=tokens.device
    )
    return MaskedTokens(gather_tokens(tokens, indices, num_prefix_tokens=p), indices)
