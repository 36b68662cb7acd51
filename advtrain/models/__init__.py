"""Architecture changes for robust models: a convolutional stem (ConvStem) for timm ViTs and ConvNeXts.

Surgery ends in ``_`` and works in place on timm models; :class:`ConvStem` is the module it inserts.
"""

from advtrain.models._convstem import ConvStem, StemAct, StemNorm, convstem_

__all__ = ["ConvStem", "StemAct", "StemNorm", "convstem_"]
