"""Zero-shot classification with a frozen text tower: class-prompt classifier weights and the logits head."""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advtrain.losses._contrastive import MAX_LOGIT_SCALE, logit_scale_value
from advtrain.losses._text_tower import FrozenTextTower, embed_texts

Template = str | Callable[[str], str]

#: The caption format of the ``../shared/datasets`` shards (``a photo of a <class name>.``).
CAPTION_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)

#: The 7-prompt ImageNet ensemble selected in CLIP's zero-shot notebook (open_clip's ``SIMPLE_IMAGENET_TEMPLATES``).
#: The full 80 OpenAI prompts are ``open_clip.OPENAI_IMAGENET_TEMPLATES`` (callables, accepted as they are).
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


def _fill(template: Template, name: str) -> str:
    if isinstance(template, str):
        return template.format(name)
    return template(name)


def text_classifier(
    tower: FrozenTextTower,
    class_names: Sequence[str],
    *,
    templates: Sequence[Template],
    batch_size: int = 256,
    cache: MutableMapping[str, Tensor] | None = None,
) -> Tensor:
    r"""Zero-shot classifier weights: per class, the renormalized mean of its normalized prompt embeddings.

    .. math::
        w_k = \frac{\bar g_k}{\|\bar g_k\|_2},\qquad
        \bar g_k = \frac1T \sum_{t=1}^{T} \frac{T(p_t(c_k))}{\|T(p_t(c_k))\|_2},

    for class names :math:`c_k`, prompt templates :math:`p_t` and the frozen text tower :math:`T`. A model trained
    with :func:`clip_contrastive_loss` then classifies with :func:`zero_shot_logits` / :class:`ZeroShotHead`.

    Args:
        tower: a :class:`FrozenTextTower`, the one the image model was trained against.
        class_names: ``K`` names, in label order.
        templates: ``T`` prompts: format strings with one ``{}`` (``"a photo of a {}."``) or callables
            ``name -> str`` (``open_clip.OPENAI_IMAGENET_TEMPLATES``). See ``CAPTION_TEMPLATES`` (the shards' caption
            format) and ``IMAGENET_TEMPLATES`` (CLIP's 7-prompt ensemble).
        batch_size: prompts per text-tower forward pass.
        cache: see :func:`embed_texts`.

    Returns:
        ``(K, D)`` float32 unit-norm rows on the tower's device, no gradient.

    Raises:
        ValueError: no classes, no templates, or a format string without exactly one ``{}``.
        TypeError: a class name that is not a ``str``, a template neither ``str`` nor callable (and see
            :func:`embed_texts`).

    Side effects:
        Writes the prompts' features into ``cache`` (when given).

    Example:
        >>> from advtrain.losses import tiny_text_tower
        >>> w = text_classifier(tiny_text_tower(), ["cat", "dog"], templates=IMAGENET_TEMPLATES)
        >>> w.shape, torch.allclose(w.norm(dim=1), torch.ones(2))
        (torch.Size([2, 32]), True)

    References:
        Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", arXiv 2103.00020.
    """
    if isinstance(class_names, str) or len(class_names) == 0:
        raise ValueError(f"class_names must be a non-empty list of str; got {class_names!r}")
    if not all(isinstance(c, str) for c in class_names):
        raise TypeError(f"class_names must hold str; got types {sorted({type(c).__name__ for c in class_names})}")
    if isinstance(templates, str) or len(templates) == 0:
        raise ValueError(f"templates must be a non-empty list of prompts; got {templates!r}")
    for t in templates:
        if isinstance(t, str):
            if t.count("{}") != 1:
                raise ValueError(f"a template string needs exactly one '{{}}' for the class name; got {t!r}")
        elif not callable(t):
            raise TypeError(f"templates must be format strings or callables; got {type(t).__name__}")
    prompts = [_fill(t, c) for c in class_names for t in templates]
    g = embed_texts(tower, prompts, batch_size=batch_size, cache=cache)
    return F.normalize(g.view(len(class_names), len(templates), -1).mean(1), dim=1)


def zero_shot_logits(
    image_features: Tensor, classifier: Tensor, *, logit_scale: float | Tensor, max_scale: float = MAX_LOGIT_SCALE
) -> Tensor:
    r"""Class logits of image features against text-classifier weights: scaled cosine similarities.

    .. math::
        z_{bk} = s\, \frac{f_b^\top w_k}{\|f_b\|_2 \|w_k\|_2},\qquad s = \min(e^{t}, s_{max}),

    the image-to-text logits of :func:`clip_contrastive_loss` with class prompts in place of captions. The scale
    does not change the argmax (top-1); it sets the softmax temperature that cross-entropy attacks see.

    Args:
        image_features: ``(B, D)`` outputs of the image model.
        classifier: ``(K, D)`` weights from :func:`text_classifier` (normalized here again).
        logit_scale: the temperature's log-parameter, as learned with the contrastive loss.
        max_scale: the cap on :math:`e^{t}` (CLIP: 100).

    Returns:
        ``(B, K)`` float32 logits (float64 for float64 inputs); differentiable in ``image_features``.

    Raises:
        ValueError: shapes that are not ``(B, D)`` and ``(K, D)`` with the same ``D``.
        TypeError: non-floating inputs, or a bad ``logit_scale``.

    Example:
        >>> import torch
        >>> w = torch.eye(3)
        >>> zero_shot_logits(torch.tensor([[0.0, 2.0, 0.0]]), w, logit_scale=0.0)
        tensor([[0., 1., 0.]])

    References:
        Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", arXiv 2103.00020.
    """
    for name, t in (("image_features", image_features), ("classifier", classifier)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor; got {getattr(t, 'dtype', type(t).__name__)}")
    if image_features.ndim != 2 or classifier.ndim != 2 or image_features.shape[1] != classifier.shape[1]:
        raise ValueError(
            f"image_features must be (B, D) and classifier (K, D) with the same D; got "
            f"{tuple(image_features.shape)} and {tuple(classifier.shape)}"
        )
    work = torch.float64 if torch.float64 in (image_features.dtype, classifier.dtype) else torch.float32
    scale = logit_scale_value(logit_scale, max_scale=max_scale).to(device=image_features.device, dtype=work)
    u = F.normalize(image_features.to(work), dim=1)
    w = F.normalize(classifier.detach().to(device=image_features.device, dtype=work), dim=1)
    return scale * (u @ w.T)


class ZeroShotHead(nn.Module):
    r"""Module form of :func:`zero_shot_logits`: ``nn.Sequential(image_model, head)`` is a ``K``-way classifier.

    The classifier weights and the temperature are frozen buffers (copied, detached), so the composed model can
    go to :func:`advtrain.pgd`, AutoAttack or a top-1 loop like any classifier, and its ``state_dict`` carries them.

    Args:
        classifier: ``(K, D)`` weights from :func:`text_classifier`.
        logit_scale: the temperature's log-parameter (a float or a one-element tensor; its value is copied).
        max_scale: the cap on :math:`e^{t}` (CLIP: 100).

    Raises:
        ValueError: a classifier that is not ``(K, D)``.

    Example:
        >>> import torch
        >>> head = ZeroShotHead(torch.eye(3), logit_scale=0.0)
        >>> head(torch.tensor([[0.0, 0.0, 5.0]]))
        tensor([[0., 0., 1.]])

    References:
        Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", arXiv 2103.00020.
    """

    def __init__(self, classifier: Tensor, *, logit_scale: float | Tensor, max_scale: float = MAX_LOGIT_SCALE):
        super().__init__()
        if not isinstance(classifier, Tensor) or classifier.ndim != 2:
            raise ValueError(f"classifier must be a (K, D) tensor; got {getattr(classifier, 'shape', classifier)!r}")
        logit_scale_value(logit_scale, max_scale=max_scale)  # validate
        t = logit_scale.detach().reshape(()).clone() if isinstance(logit_scale, Tensor) else torch.tensor(logit_scale)
        self.register_buffer("classifier", classifier.detach().clone())
        self.register_buffer("logit_scale", t.to(device=classifier.device, dtype=torch.float32))
        self.max_scale = float(max_scale)

    def forward(self, image_features: Tensor) -> Tensor:
        return zero_shot_logits(image_features, self.classifier, logit_scale=self.logit_scale, max_scale=self.max_scale)

    def extra_repr(self) -> str:
        k, d = self.classifier.shape
        return f"classes={k}, dim={d}, max_scale={self.max_scale}"
