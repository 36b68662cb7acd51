"""BatchNorm for adversarial training: split (main + auxiliary) BN, ghost BN, shuffle-BN in one process or across ranks.

AdvProp normalizes clean images with the main BN and adversarial ones with an auxiliary BN; Fast AdvProp adds
shuffle-BN so that no BatchNorm batch holds an example together with its adversarial twin. Module surgery ends in
``_`` and keeps checkpoint keys; routes and ghost groups are ``with`` blocks that restore what they change.
"""

from advtrain.bn._shuffle import (
    exchange_rows,
    invert_permutation,
    shuffle_across_ranks,
    shuffle_permutation,
    unshuffle_across_ranks,
)
from advtrain.bn._split import (
    Route,
    SplitBatchNorm,
    SplitBatchNorm1d,
    SplitBatchNorm2d,
    SplitBatchNorm3d,
    SplitParameters,
    SplitSyncBatchNorm,
    bn_route,
    convert_split_bn_,
    ghost_bn,
    revert_split_bn_,
    split_parameters,
)

__all__ = [
    "Route",
    "SplitBatchNorm",
    "SplitBatchNorm1d",
    "SplitBatchNorm2d",
    "SplitBatchNorm3d",
    "SplitParameters",
    "SplitSyncBatchNorm",
    "bn_route",
    "convert_split_bn_",
    "exchange_rows",
    "ghost_bn",
    "invert_permutation",
    "revert_split_bn_",
    "shuffle_across_ranks",
    "shuffle_permutation",
    "split_parameters",
    "unshuffle_across_ranks",
]
