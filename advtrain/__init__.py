"""advtrain: composable, functional adversarial-training primitives for PyTorch.

>>> from advtrain import pgd, fgsm, resize_reduce
"""

from advtrain.attacks import fgsm, pgd, project
from advtrain.losses import (
    ClipContrastiveLoss,
    ZeroShotHead,
    clip_contrastive_loss,
    contrastive_attack_loss,
    cross_entropy,
    embed_texts,
    load_text_tower,
    text_classifier,
)
from advtrain.tokens import resize_reduce

__version__ = "0.1.0"

__all__ = [
    "ClipContrastiveLoss",
    "ZeroShotHead",
    "clip_contrastive_loss",
    "contrastive_attack_loss",
    "cross_entropy",
    "embed_texts",
    "fgsm",
    "load_text_tower",
    "pgd",
    "project",
    "resize_reduce",
    "text_classifier",
]
