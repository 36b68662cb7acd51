"""Random target classes for targeted attacks (AdvProp's training attack)."""

from __future__ import annotations

import torch
from torch import Tensor


def random_targets(y: Tensor, num_classes: int, *, generator: torch.Generator | None = None) -> Tensor:
    r"""A target class per sample, uniform over the ``num_classes - 1`` classes other than its label.

    .. math:: t_i = (y_i + o_i) \bmod K, \qquad o_i \sim \mathcal{U}\{1, \dots, K - 1\},

    so :math:`t_i \ne y_i` always and every other class has probability :math:`1 / (K - 1)`: the random target of
    AdvProp's training attack (Xie et al.), with the offset range of the targeted PGD attacker in Xie et al.'s
    Feature Denoising code (``[1, K)``). Pass it to :func:`advtrain.pgd` with ``targeted=True``. One draw of
    ``B`` integers from ``generator`` (on the generator's device), so a run seeded per step replays it.

    Args:
        y: ``(B,)`` integer labels in ``[0, num_classes)``.
        num_classes: ``K >= 2``.
        generator: source of the offsets; None: torch's global generator.

    Returns:
        ``(B,)`` int64 targets on ``y``'s device, each different from its label.

    Raises:
        TypeError: ``y`` not an integer tensor, ``num_classes`` not an int.
        ValueError: ``y`` not 1-D, ``num_classes < 2``, labels outside ``[0, num_classes)``.

    Example:
        >>> y = torch.tensor([0, 1, 2, 2])
        >>> t = random_targets(y, 3, generator=torch.Generator().manual_seed(0))
        >>> bool((t != y).all()), bool(((0 <= t) & (t < 3)).all())
        (True, True)

    References:
        Xie et al., "Adversarial Examples Improve Image Recognition", arXiv 1911.09665.
        Xie et al., "Feature Denoising for Improving Adversarial Robustness", arXiv 1812.03411 (Sec. 6).
    """
    if not isinstance(y, Tensor) or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"y must be an integer tensor of labels; got {getattr(y, 'dtype', type(y).__name__)}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool):
        raise TypeError(f"num_classes must be an int; got {type(num_classes).__name__}")
    if y.ndim != 1:
        raise ValueError(f"y must be (B,) labels; got shape {tuple(y.shape)}")
    if num_classes < 2:
        raise ValueError(f"a target different from the label needs num_classes >= 2; got {num_classes}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}); got min {int(y.min())}, max {int(y.max())}")
    gdev = generator.device if generator is not None else y.device
    offset = torch.randint(1, num_classes, y.shape, generator=generator, device=gdev, dtype=torch.int64)
    return (y.to(torch.int64) + offset.to(y.device)) % num_classes
