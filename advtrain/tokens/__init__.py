"""Token reducers: fewer image tokens per step, by resizing, random masking or block masking (AdvXL, FLIP).

Sampling keep-indices and applying them are separate functions, so one draw per batch serves both the attack
and the training step. Indices are ``(B, K)`` int64 into the patch tokens; prefix tokens (CLS, registers) are
never dropped. :func:`vit_forward_tokens` runs a timm ``VisionTransformer`` on the kept tokens only, and
:func:`resample_vit_` moves it between resolutions.
"""

from advtrain.tokens._indices import block_shape, num_kept, sample_block_indices, sample_random_indices
from advtrain.tokens._mask import MaskedTokens, block_mask, gather_tokens, random_mask
from advtrain.tokens._resize import resize_reduce
from advtrain.tokens._vit import resample_vit_, vit_forward_tokens

__all__ = [
    "MaskedTokens",
    "block_mask",
    "block_shape",
    "gather_tokens",
    "num_kept",
    "random_mask",
    "resample_vit_",
    "resize_reduce",
    "sample_block_indices",
    "sample_random_indices",
    "vit_forward_tokens",
]
