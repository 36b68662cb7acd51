"""Losses: cross-entropy with hard or soft targets, and AdvXL's frozen-text contrastive path.

The image-text path of AdvXL (arXiv 2401.04727, Sec. 3.3): an image model, its projection to the text dimension
included, is trained with :func:`clip_contrastive_loss` (Eq. 2) against the features that a frozen open_clip text
tower (:func:`load_text_tower`, :func:`embed_texts`) gives the captions (:func:`read_captions`); the attack maximizes
the same loss (:func:`contrastive_attack_loss` as pgd's ``loss_fn``, Eq. 3); labelled data is evaluated through
:func:`text_classifier` and :class:`ZeroShotHead`. Under data parallelism the loss takes its negatives from the
global batch (``gather=True``, :func:`gather_features`); the attack gets the other ranks' captions once, before it
runs, as extra negatives (:func:`gather_other_ranks`).
"""

from advtrain.losses._captions import read_captions
from advtrain.losses._contrastive import (
    INIT_LOGIT_SCALE,
    MAX_LOGIT_SCALE,
    ClipContrastiveLoss,
    clip_contrastive_loss,
    contrastive_attack_loss,
    logit_scale_value,
)
from advtrain.losses._cross_entropy import cross_entropy
from advtrain.losses._gather import gather_features, gather_other_ranks
from advtrain.losses._text_tower import FrozenTextTower, TextCache, embed_texts, load_text_tower, tiny_text_tower
from advtrain.losses._zero_shot import (
    CAPTION_TEMPLATES,
    IMAGENET_TEMPLATES,
    ZeroShotHead,
    text_classifier,
    zero_shot_logits,
)

__all__ = [
    "CAPTION_TEMPLATES",
    "ClipContrastiveLoss",
    "FrozenTextTower",
    "IMAGENET_TEMPLATES",
    "INIT_LOGIT_SCALE",
    "MAX_LOGIT_SCALE",
    "TextCache",
    "ZeroShotHead",
    "clip_contrastive_loss",
    "contrastive_attack_loss",
    "cross_entropy",
    "embed_texts",
    "gather_features",
    "gather_other_ranks",
    "load_text_tower",
    "logit_scale_value",
    "read_captions",
    "text_classifier",
    "tiny_text_tower",
    "zero_shot_logits",
]
