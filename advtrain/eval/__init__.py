"""Evaluation: clean and robust accuracy over a loader (PGD, AutoAttack), common-corruption error, with progress
and summaries."""

from advtrain.eval._autoattack import IMAGENET_EPS, autoattack
from advtrain.eval._corruptions import CorruptedImages, corruption_errors
from advtrain.eval._resolution import (
    ResolutionResult,
    format_resolution_table,
    plot_resolution,
    resize_images,
    resolution_sweep,
)
from advtrain.eval._robust import AttackFn, EvalReport, eval_mode, evaluate

__all__ = ["IMAGENET_EPS", "AttackFn", "EvalReport", "autoattack", "eval_mode", "evaluate"]
__all__ += ["CorruptedImages", "corruption_errors"]
__all__ += ["ResolutionResult", "format_resolution_table", "plot_resolution", "resize_images", "resolution_sweep"]
