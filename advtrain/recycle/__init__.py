"""Gradient recycling (Free AT, Fast AdvProp): one backward yields the weight gradients and the next perturbation.

These are the only functions in advtrain that write ``.grad``; each says so in a ``Side effects:`` section.
"""

from advtrain.recycle._recycle import (
    Recycled,
    UpdateCounts,
    maybe_no_sync,
    recycled_step,
    scale_grads_,
    sync_update_speed_,
)

__all__ = ["Recycled", "UpdateCounts", "maybe_no_sync", "recycled_step", "scale_grads_", "sync_update_speed_"]
