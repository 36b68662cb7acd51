"""Models: architecture changes for robust models (ConvStem for timm ViTs and ConvNeXts) and strict weight loading.

Surgery ends in ``_`` and works in place on timm models; :class:`ConvStem` is the module it inserts.
:func:`load_weights` loads any checkpoint (plain, recipe, DDP / compile / wrapper prefixes) strictly and reports
every key that did not match.
"""

from advtrain.models._convstem import ConvStem, StemAct, StemNorm, convstem_
from advtrain.models._weights import (
    WeightsMismatchError,
    WeightsReport,
    file_sha256,
    find_state_dict,
    load_weights,
    read_checkpoint,
    strip_prefixes,
)

__all__ = ["ConvStem", "StemAct", "StemNorm", "convstem_"]
__all__ += [
    "WeightsMismatchError",
    "WeightsReport",
    "file_sha256",
    "find_state_dict",
    "load_weights",
    "read_checkpoint",
    "strip_prefixes",
]
