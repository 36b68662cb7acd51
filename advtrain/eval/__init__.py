"""Evaluation: clean and robust accuracy over a loader (PGD, AutoAttack), common-corruption error (regenerated on the
fly, or the official ImageNet-C folders), ImageNet-R and Stylized-ImageNet from folders, with progress and summaries."""

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
from advtrain.eval._shift import (
    ALEXNET_ERRORS,
    check_class_folder,
    check_corruption_names,
    check_imagenet_c,
    check_shift_sets,
    class_folder_error,
    corruption_bars,
    folder_error,
    imagenet_c_errors,
    imagenet_classes,
    mean_corruption_error,
    model_classes,
    shift_eval,
    shift_table,
)

__all__ += ["ALEXNET_ERRORS", "check_class_folder", "check_corruption_names", "check_imagenet_c", "check_shift_sets"]
__all__ += ["class_folder_error", "corruption_bars"]
__all__ += ["folder_error", "imagenet_c_errors", "imagenet_classes", "mean_corruption_error", "model_classes"]
__all__ += ["shift_eval", "shift_table"]
__all__ += ["ResolutionResult", "format_resolution_table", "plot_resolution", "resize_images", "resolution_sweep"]

# The robustness protocol shared by ``python -m advtrain.eval`` and the recipes
from advtrain.eval._protocol import (
    AttackSpec,
    EvalProtocol,
    RobustReport,
    SampleLog,
    eps_label,
    max_sensible_eps,
    read_sample_log,
    recipe_eval,
    report_from_records,
    robust_eval,
    strict_float32,
    wilson_interval,
)
from advtrain.eval._subset import (
    ROBUSTBENCH_IMAGENET_SHA256,
    imagenet_val_id,
    robustbench_imagenet_ids,
    robustbench_subset,
    split_for_rank,
    stratified_subset,
    subset_digest,
)

__all__ += [
    "AttackSpec",
    "EvalProtocol",
    "RobustReport",
    "SampleLog",
    "eps_label",
    "max_sensible_eps",
    "read_sample_log",
    "recipe_eval",
    "report_from_records",
    "robust_eval",
    "strict_float32",
    "wilson_interval",
]
__all__ += [
    "ROBUSTBENCH_IMAGENET_SHA256",
    "imagenet_val_id",
    "robustbench_imagenet_ids",
    "robustbench_subset",
    "split_for_rank",
    "stratified_subset",
    "subset_digest",
]
