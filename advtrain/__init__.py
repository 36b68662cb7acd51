"""advtrain: composable, functional adversarial-training primitives for PyTorch.

>>> from advtrain import pgd, fgsm, resize_reduce
"""

from advtrain.attacks import apgd, fgsm, pgd, project
from advtrain.bn import (
    bn_route,
    convert_split_bn_,
    ghost_bn,
    revert_split_bn_,
    shuffle_across_ranks,
    shuffle_permutation,
    unshuffle_across_ranks,
)
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
from advtrain.recycle import recycled_step, scale_grads_, sync_update_speed_
from advtrain.tokens import resize_reduce

__version__ = "0.1.0"

__all__ = [
    "ClipContrastiveLoss",
    "ZeroShotHead",
    "apgd",
    "bn_route",
    "clip_contrastive_loss",
    "contrastive_attack_loss",
    "convert_split_bn_",
    "cross_entropy",
    "embed_texts",
    "fgsm",
    "ghost_bn",
    "load_text_tower",
    "pgd",
    "project",
    "recycled_step",
    "resize_reduce",
    "revert_split_bn_",
    "scale_grads_",
    "shuffle_across_ranks",
    "shuffle_permutation",
    "sync_update_speed_",
    "text_classifier",
    "unshuffle_across_ranks",
]
