"""The frozen-text contrastive loss of AdvXL (Eq. 2), its attack adapter (Eq. 3), and the learnable temperature."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advtrain.losses._cross_entropy import Reduction
from advtrain.losses._gather import gather_features, world_size

Direction = Literal["symmetric", "image_to_text"]

#: CLIP's cap on the logit scale :math:`e^{t}` (a temperature of at least 0.01).
MAX_LOGIT_SCALE = 100.0
#: CLIP's initial temperature, 0.07: the log-parameter starts at ``log(1 / 0.07)``.
INIT_LOGIT_SCALE = math.log(1 / 0.07)


def logit_scale_value(logit_scale: float | Tensor, *, max_scale: float = MAX_LOGIT_SCALE) -> Tensor:
    r"""The multiplier of the cosine similarities, :math:`\min(e^{t}, s_{max})`, from CLIP's log-parameter :math:`t`.

    The clamp is applied in the forward pass, as a value: above the cap the scale is constant and its gradient with
    respect to :math:`t` is zero, so the parameter stops growing (CLIP clamps the parameter in place after each
    optimizer step instead; both keep the logits scaled by at most ``max_scale``).

    Args:
        logit_scale: the log-parameter :math:`t`, a float or a one-element tensor (a ``Parameter`` to learn it).
        max_scale: the cap :math:`s_{max} > 0` (CLIP: 100).

    Returns:
        A 0-dim tensor, float64 for a Python float or a float64 tensor, float32 otherwise; differentiable in a
        tensor ``logit_scale``.

    Raises:
        TypeError: ``logit_scale`` neither a real number nor a floating tensor.
        ValueError: a tensor with more than one element, a non-finite float, or ``max_scale <= 0`` (a tensor's
            value is not inspected: that would cost a device sync per call).

    Example:
        >>> import math
        >>> round(float(logit_scale_value(math.log(10.0))), 6)
        10.0
        >>> float(logit_scale_value(math.log(1e4)))
        100.0

    References:
        Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", arXiv 2103.00020.
    """
    if not (isinstance(max_scale, numbers.Real) and math.isfinite(max_scale) and max_scale > 0):
        raise ValueError(f"max_scale must be finite and > 0; got {max_scale!r}")
    if isinstance(logit_scale, Tensor):
        if not logit_scale.is_floating_point():
            raise TypeError(f"logit_scale must be a floating tensor; got dtype {logit_scale.dtype}")
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must hold one value; got shape {tuple(logit_scale.shape)}")
        t = logit_scale.reshape(()) if logit_scale.dtype == torch.float64 else logit_scale.reshape(()).float()
    elif isinstance(logit_scale, numbers.Real) and not isinstance(logit_scale, bool):
        if not math.isfinite(logit_scale):
            raise ValueError(f"logit_scale must be finite; got {logit_scale}")
        t = torch.tensor(float(logit_scale), dtype=torch.float64)
    else:
        raise TypeError(f"logit_scale must be a float or a tensor; got {type(logit_scale).__name__}")
    return t.exp().clamp(max=max_scale)


def _check_features(image_features: Tensor, text_features: Tensor) -> None:
    for name, f in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(f, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(f).__name__}")
        if not f.is_floating_point():
            raise TypeError(f"{name} must be floating; got dtype {f.dtype}")
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            f"image_features and text_features must both be (B, D) with the same B and D; got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)} (project the image features to the "
            f"text dimension inside the image model)"
        )
    if image_features.shape[0] == 0:
        raise ValueError("the contrastive loss needs a batch of at least one pair; got B = 0")


def clip_contrastive_loss(
    image_features: Tensor,
    text_features: Tensor,
    *,
    logit_scale: float | Tensor,
    max_scale: float = MAX_LOGIT_SCALE,
    direction: Direction = "symmetric",
    reduction: Reduction = "mean",
    gather: bool = False,
    text_negatives: Tensor | None = None,
) -> Tensor:
    r"""Symmetric InfoNCE between image features and the frozen text features of their captions (AdvXL Eq. 2).

    With L2-normalized rows :math:`u_i = f_i / \|f_i\|`, :math:`v_j = g_j / \|g_j\|` and the clamped scale
    :math:`s = \min(e^{t}, s_{max})`, the logits are :math:`z_{ij} = s\, u_i^\top v_j` and the per-sample loss is

    .. math::
        \ell_i = \tfrac12 \Big( \underbrace{\log \textstyle\sum_j e^{z_{ij}} - z_{ii}}_{\text{image } i \to
        \text{texts}} + \underbrace{\log \textstyle\sum_j e^{z_{ji}} - z_{ii}}_{\text{text } i \to
        \text{images}} \Big),

    whose mean over the batch is CLIP's loss (the average of the two cross-entropies). The text features are
    constants: they are detached, so no gradient reaches them or the tower that made them, whatever the caller
    passes. Gradients flow to ``image_features`` (the trained image model, projection included) and to a tensor
    ``logit_scale`` (the learnable temperature) while the scale is below the cap. The per-sample losses are coupled
    through the text-to-image term (column :math:`i` involves every image); ``direction="image_to_text"`` keeps only
    the first term, :math:`\ell_i = \log \sum_j e^{z_{ij}} - z_{ii}`, which depends on image :math:`i` alone.
    Captions repeated inside a batch count as negatives of each other, as in CLIP. Computed in float32 (float64 for
    float64 inputs) whatever the features' dtype.

    Global-batch negatives (``gather=True``): under data parallelism each rank holds ``B`` of the ``N = W B`` pairs.
    With ``gather=True`` and an initialized process group of ``W > 1`` ranks, the normalized image and text features
    are all-gathered (:func:`gather_features`, one collective) and every rank computes the loss of the whole global
    batch, as CLIP and AdvXL do: every caption of the global batch is a negative of every image. The returned value
    is then the global batch's loss (the same on every rank). Gradients flow to this rank's own image features only,
    multiplied by ``W``, so that DDP's (or FSDP's) average of the ranks' gradients equals the gradient that one
    process holding the global batch computes; the temperature's gradient is the global one on every rank already.
    A collective: every rank must call it, with the same ``B``; never inside an attack (see
    :func:`contrastive_attack_loss`). Open_clip's ``local_loss`` variant (each rank's rows against the global
    columns, labels offset by rank) is not offered: with the gradient factor above, the full loss on every rank
    gives the exact global gradient and costs ``N x N`` logits instead of ``B x N``, negligible beside the image
    model. Without a process group (or with one rank) ``gather`` changes nothing.

    Extra negatives (``text_negatives``, ``(M, D)``): captions that are negatives of every image, appended to the
    image-to-text term's columns, :math:`\ell^{i\to t}_i = \log(\sum_j e^{z_{ij}} + \sum_m e^{s u_i^\top n_m}) -
    z_{ii}`; the text-to-image term stays over the ``B`` pairs. The contrastive attack passes the other ranks'
    captions this way (gathered once, outside the attack).

    Args:
        image_features: ``(B, D)`` outputs of the image model (any scale; normalized here).
        text_features: ``(B, D)`` text features of the ``B`` captions, row ``i`` pairing with image ``i`` (any scale).
        logit_scale: the log-parameter :math:`t` (CLIP initializes it to ``log(1 / 0.07)``), a float or a
            one-element tensor.
        max_scale: the cap on :math:`e^{t}` (CLIP: 100).
        direction: ``"symmetric"`` (Eq. 2) or ``"image_to_text"`` (the image-side term only).
        reduction: ``"none"`` for the ``(B,)`` per-sample losses (what attacks need), ``"mean"`` or ``"sum"``
            (over the global batch with ``gather``).
        gather: all-gather the features of every rank and compute the global batch's loss (see above); needs
            ``reduction`` ``"mean"`` or ``"sum"``.
        text_negatives: ``(M, D)`` extra caption features, negatives of every image (detached), or ``None``.

    Returns:
        ``(B,)`` losses for ``reduction="none"``, else a scalar.

    Raises:
        TypeError: non-tensor or non-floating features; a ``logit_scale`` of the wrong type.
        ValueError: features that are not both ``(B, D)`` with equal shapes, an empty batch, an unknown
            ``direction`` or ``reduction``, ``gather`` with ``reduction="none"``, ``text_negatives`` that are not
            ``(M, D)``, ranks with different batch shapes under ``gather``, or a bad ``logit_scale`` /
            ``max_scale`` (see :func:`logit_scale_value`).

    Example:
        >>> import math, torch
        >>> g = torch.eye(3)
        >>> loss = clip_contrastive_loss(5 * g, g, logit_scale=0.0)  # scale 1: logits are the cosines
        >>> round(float(loss), 6) == round(math.log(2 + math.e) - 1, 6)  # log-sum-exp of (1, 0, 0) minus the positive
        True

    References:
        Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", arXiv 2103.00020.
        Wang et al., "Revisiting Adversarial Training at Scale" (AdvXL, Sec. 3.3, Eq. 2), arXiv 2401.04727.
    """
    _check_features(image_features, text_features)
    if direction not in ("symmetric", "image_to_text"):
        raise ValueError(f"direction must be 'symmetric' or 'image_to_text'; got {direction!r}")
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum'; got {reduction!r}")
    if gather and reduction == "none":
        raise ValueError("gather=True computes the global batch's loss: use reduction 'mean' or 'sum', not 'none'")
    work = torch.float64 if torch.float64 in (image_features.dtype, text_features.dtype) else torch.float32
    device = image_features.device
    scale = logit_scale_value(logit_scale, max_scale=max_scale).to(device=device, dtype=work)
    u = F.normalize(image_features.to(work), dim=1)
    v = F.normalize(text_features.detach().to(device=device, dtype=work), dim=1)
    negatives = _negatives(text_negatives, u)
    world = world_size() if gather else 1
    if world > 1:  # one collective for both; the local image rows keep their graph, their gradient times W
        both = gather_features(torch.cat([u, v], dim=1), grad_scale=world)
        u, v = both[:, : u.shape[1]], both[:, u.shape[1] :]
    logits = scale * (u @ v.T)
    positive = logits.diagonal()
    to_texts = logits if negatives is None else torch.cat([logits, scale * (u @ negatives.T)], dim=1)
    match direction:
        case "symmetric":
            loss = 0.5 * ((to_texts.logsumexp(1) - positive) + (logits.logsumexp(0) - positive))
        case "image_to_text":
            loss = to_texts.logsumexp(1) - positive
    match reduction:
        case "none":
            return loss
        case "mean":
            return loss.mean()
        case "sum":
            return loss.sum()


def _negatives(text_negatives: Tensor | None, u: Tensor) -> Tensor | None:
    """Normalized, detached ``(M, D)`` extra negatives in ``u``'s dtype and device, or None for none / M = 0."""
    if text_negatives is None:
        return None
    if not isinstance(text_negatives, Tensor) or not text_negatives.is_floating_point():
        raise TypeError(f"text_negatives must be a floating tensor; got {type(text_negatives).__name__}")
    if text_negatives.ndim != 2 or text_negatives.shape[1] != u.shape[1]:
        raise ValueError(f"text_negatives must be (M, D) with D = {u.shape[1]}; got {tuple(text_negatives.shape)}")
    if text_negatives.shape[0] == 0:
        return None
    return F.normalize(text_negatives.detach().to(device=u.device, dtype=u.dtype), dim=1)


class ClipContrastiveLoss(nn.Module):
    r"""Module form of :func:`clip_contrastive_loss` that owns the learnable temperature.

    Holds ``logit_scale``, the log-parameter :math:`t` initialized to ``log(init_scale)`` (CLIP: ``1 / 0.07``);
    add this module's parameters to the optimizer to learn it. ``forward(image_features, text_features)`` is
    ``clip_contrastive_loss(image_features, text_features, logit_scale=self.logit_scale, ...)``.

    Args:
        init_scale: the initial scale :math:`e^{t_0}`, in ``(0, max_scale]``.
        max_scale: the cap on :math:`e^{t}` (CLIP: 100).
        learnable: ``False`` keeps the temperature fixed (a buffer instead of a parameter).
        direction: see :func:`clip_contrastive_loss`.
        reduction: see :func:`clip_contrastive_loss`.
        gather: see :func:`clip_contrastive_loss` (global-batch negatives across ranks; a collective).

    Raises:
        ValueError: ``init_scale`` outside ``(0, max_scale]``.

    Example:
        >>> import torch
        >>> loss_fn = ClipContrastiveLoss()
        >>> f, g = torch.randn(4, 8), torch.randn(4, 8)
        >>> loss = loss_fn(f, g)
        >>> torch.allclose(loss, clip_contrastive_loss(f, g, logit_scale=loss_fn.logit_scale))
        True

    References:
        Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", arXiv 2103.00020.
        Wang et al., "Revisiting Adversarial Training at Scale" (AdvXL), arXiv 2401.04727.
    """

    def __init__(
        self,
        *,
        init_scale: float = 1 / 0.07,
        max_scale: float = MAX_LOGIT_SCALE,
        learnable: bool = True,
        direction: Direction = "symmetric",
        reduction: Reduction = "mean",
        gather: bool = False,
    ):
        super().__init__()
        if not (isinstance(init_scale, numbers.Real) and 0 < init_scale <= max_scale):
            raise ValueError(f"init_scale must be in (0, max_scale={max_scale}]; got {init_scale!r}")
        t = torch.tensor(math.log(init_scale))
        if learnable:
            self.logit_scale = nn.Parameter(t)
        else:
            self.register_buffer("logit_scale", t)
        self.max_scale = float(max_scale)
        self.direction: Direction = direction
        self.reduction: Reduction = reduction
        self.gather = bool(gather)

    def forward(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        return clip_contrastive_loss(
            image_features,
            text_features,
            logit_scale=self.logit_scale,
            max_scale=self.max_scale,
            direction=self.direction,
            reduction=self.reduction,
            gather=self.gather,
        )

    def extra_repr(self) -> str:
        return (
            f"max_scale={self.max_scale}, direction={self.direction!r}, reduction={self.reduction!r}, "
            f"gather={self.gather}"
        )


def contrastive_attack_loss(
    *,
    logit_scale: float | Tensor,
    max_scale: float = MAX_LOGIT_SCALE,
    direction: Direction = "symmetric",
    text_negatives: Tensor | None = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    r"""A ``loss_fn`` for :func:`advtrain.pgd` that maximizes the contrastive loss (AdvXL Eq. 3).

    .. math::
        x_{adv} = \arg\max_{\|x' - x\| \le \epsilon} \mathcal{L}_{con}\big(f(x'), g(T)\big),

    with the image model :math:`f` (projection included) and the frozen text features :math:`g(T)` of the batch's
    captions. The text features travel as pgd's ``y``: ``pgd(image_model, x, text_features, loss_fn=...)``, so one
    ``loss_fn`` serves every batch and pgd checks that ``y`` has ``x``'s batch size. The returned function is
    ``lambda image_features, text_features: clip_contrastive_loss(..., reduction="none")``: ``(B,)`` per-sample
    losses. A tensor ``logit_scale`` is detached (the attack never builds a graph to the temperature) but shares its
    storage, so the function reads the current value after optimizer steps.

    With ``direction="symmetric"`` the per-sample losses are coupled through the text-to-image term, so pgd's
    ``return_best`` keeps per-sample iterates by a score that other samples also move; pgd's ascent itself is on the
    batch loss either way. ``direction="image_to_text"`` gives per-sample losses that depend on their own image only.

    Under data parallelism (what the AdvXL recipe does): the attack runs on each rank's ``B`` images alone and must
    not communicate, since a collective per attack step would tie the ranks' inner loops together (and deadlock
    any rank that ran a different number of steps). So the returned function never gathers. Pass the other ranks'
    caption features, gathered once before the attack (:func:`gather_other_ranks`), as ``text_negatives``: the
    image-to-text term of each local image then runs over all ``N`` captions of the global batch, exactly as in the
    training loss with ``gather=True``, while the text-to-image term runs over the ``B`` local images (the other
    ranks' images are being perturbed on their ranks and would need a collective per step). With one rank this is
    exactly Eq. 3's loss.

    Args:
        logit_scale: the temperature's log-parameter (a float, or the learnable tensor).
        max_scale: the cap on :math:`e^{t}` (CLIP: 100).
        direction: ``"symmetric"`` (the training loss, Eq. 3) or ``"image_to_text"`` (separable per sample).
        text_negatives: ``(M, D)`` extra caption features, negatives of every image (detached; e.g. the other
            ranks' captions), or ``None``.

    Returns:
        ``loss_fn(image_features, text_features) -> (B,)``.

    Raises:
        TypeError, ValueError: a bad ``logit_scale``, ``max_scale`` or ``direction`` (checked now, not at attack time).

    Example:
        >>> import torch
        >>> from advtrain import pgd
        >>> image_model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8))
        >>> x, text = torch.rand(4, 3, 2, 2), torch.randn(4, 8)
        >>> loss_fn = contrastive_attack_loss(logit_scale=2.0)
        >>> x_adv = pgd(image_model, x, text, eps=8 / 255, step_size=2 / 255, steps=3, loss_fn=loss_fn,
        ...             random_start=False)
        >>> bool(loss_fn(image_model(x_adv), text).mean() > loss_fn(image_model(x), text).mean())
        True

    References:
        Wang et al., "Revisiting Adversarial Training at Scale" (AdvXL, Sec. 3.3, Eq. 3), arXiv 2401.04727.
        Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", arXiv 1706.06083.
    """
    scale_param = logit_scale.detach() if isinstance(logit_scale, Tensor) else logit_scale
    logit_scale_value(scale_param, max_scale=max_scale)  # validate now
    if direction not in ("symmetric", "image_to_text"):
        raise ValueError(f"direction must be 'symmetric' or 'image_to_text'; got {direction!r}")
    negatives = None if text_negatives is None else text_negatives.detach()
    if negatives is not None and (negatives.ndim != 2 or not negatives.is_floating_point()):
        raise ValueError(f"text_negatives must be a floating (M, D) tensor; got shape {tuple(negatives.shape)}")

    def loss_fn(image_features: Tensor, text_features: Tensor) -> Tensor:
        return clip_contrastive_loss(
            image_features,
            text_features,
            logit_scale=scale_param,
            max_scale=max_scale,
            direction=direction,
            reduction="none",
            text_negatives=negatives,
        )

    return loss_fn
