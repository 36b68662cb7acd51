"""A thin wrapper of the reference AutoAttack (the ``pyautoattack`` package) with advtrain's conventions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from advtrain.attacks import _checks
from advtrain.attacks._projections import Norm

#: RobustBench's ImageNet-scale radii (pixels in [0, 1]), the AdvXL paper's evaluation.
IMAGENET_EPS: dict[str, float] = {"linf": 4 / 255, "l2": 2.0, "l1": 75.0}

_AA_NORM = {"linf": "Linf", "l2": "L2", "l1": "L1"}
_AA_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")


def autoattack(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    *,
    norm: Norm,
    eps: float,
    version: str = "standard",
    attacks: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int | None = None,
) -> Tensor:
    r"""AutoAttack (Croce & Hein) through the reference implementation, with :func:`advtrain.pgd`'s call shape.

    ``version="standard"`` runs APGD-CE, APGD-T, FAB-T and Square, as RobustBench does; ``"custom"`` runs the
    named ``attacks`` only. Targeted attacks use ``min(9, K - 1)`` target classes, so models with fewer than 10
    classes work; below 4 classes APGD-T (whose targeted DLR loss needs 4 logits) is skipped. Use it as an
    attack in :func:`advtrain.eval.evaluate` on a fixed subset (``max_samples``), e.g.
    ``functools.partial(autoattack, norm="linf", eps=IMAGENET_EPS["linf"])``.

    Args:
        model: maps pixels in [0, 1] to ``(B, K)`` logits; normalization inside. Run it in eval mode.
        x: ``(B, C, H, W)`` floating images in [0, 1].
        y: ``(B,)`` int64 labels.
        norm: ``"linf"``, ``"l2"`` or ``"l1"``.
        eps: radius in the norm's units (see :data:`IMAGENET_EPS`).
        version: ``"standard"``, ``"plus"``, ``"rand"`` or ``"custom"``.
        attacks: with ``version="custom"``: a subset of ``apgd-ce, apgd-dlr, fab, square, apgd-t, fab-t``.
        seed: AutoAttack's seed.
        batch_size: AutoAttack's internal batch size (default: the whole ``x``).

    Returns:
        The adversarial examples, detached, shaped like ``x``; AutoAttack leaves robust samples unchanged.

    Raises:
        ValueError / TypeError: as :func:`advtrain.pgd` for ``x``, ``y``, ``eps`` and ``norm``; an unknown version
        or attack name.

    Side effects:
        None. FAB calls ``backward()``, so parameters are frozen (``requires_grad=False``) for the call and
        restored afterwards: their ``.grad`` is never written. Buffers and modes are restored too. AutoAttack's
        own log lines go to the ``logging`` logger ``"auto-attack"``.

    References:
        Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
        attacks", ICML 2020, arXiv 2003.01690. Croce et al., "RobustBench", arXiv 2010.09670.
    """
    from pyautoattack import AutoAttack

    _checks.check_model(model)
    _checks.check_images(x, (0.0, 1.0))
    _checks.check_norm(norm)
    _checks.check_targets(y, x.shape[0])
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a number > 0; got {eps!r}")
    if version not in ("standard", "plus", "rand", "custom"):
        raise ValueError(f"version must be 'standard', 'plus', 'rand' or 'custom'; got {version!r}")
    if version == "custom":
        if not attacks or any(a not in _AA_ATTACKS for a in attacks):
            raise ValueError(f"version='custom' needs attacks from {_AA_ATTACKS}; got {attacks!r}")
    elif attacks is not None:
        raise ValueError(f"attacks={attacks!r} is only for version='custom'")
    _checks.check_autograd_available("autoattack")
    if x.shape[0] == 0:
        return x.detach().clone()

    with _checks.preserve_model_state(model), _frozen_parameters(model), torch.enable_grad():
        with torch.no_grad():
            classes = int(model(x[:1]).shape[1])
        aa = AutoAttack(
            model,
            norm=_AA_NORM[norm],
            eps=float(eps),
            version=version,
            seed=seed,
            device=x.device,
            attacks=list(attacks) if version == "custom" else None,
        )
        aa.apgd_targeted.n_target_classes = min(aa.apgd_targeted.n_target_classes, classes - 1)
        aa.fab.n_target_classes = min(aa.fab.n_target_classes, classes - 1)
        if classes < 4:  # APGD-T's targeted DLR loss needs the 4 largest logits
            aa.attacks_to_run = [a for a in aa.attacks_to_run if a != "apgd-t"]
        x_adv, _ = aa.run_standard_evaluation(x.detach(), y.detach(), batch_size=batch_size or x.shape[0])
    return x_adv.detach().to(x.dtype)


@contextmanager
def _frozen_parameters(model):
    """Switches ``requires_grad`` off on every parameter for the duration, then restores each flag."""
    params = list(model.parameters()) if isinstance(model, nn.Module) else []
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
