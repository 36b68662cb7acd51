"""The run toolkit: what every training loop needs, once, for both recipes and for a user's own loop.

Distributed setup from the environment, a run directory (config check with the differing fields named, a fresh
start that moves old files aside, resume or a clear refusal), atomic sha256-checked checkpoints that keep every
rank's data-loader and RNG state, metrics as JSON lines (cut back on resume, a torn last line dropped) with
optional TensorBoard / Weights & Biases sinks, the metrics plot, a progress display that suits terminals and SLURM
logs, loop timing (data wait, end-to-end images per second), and typed config dataclasses with dotted overrides.

A loop built from it (a sketch; ``recipes/*/train.py`` are complete ones)::

    dd = setup_distributed(device=None)
    log = run_logger("mine", dd)
    run = RunDir("runs/mine", dd=dd, log=log)
    run.prepare(dataclasses.asdict(cfg), meta=environment_meta(), fresh=False)
    objects = {"model": model, "optim": opt, "loader": loader}
    state = run.resume()
    if state is not None:
        restore_training_state(state, objects, dd)
    ...
    save_checkpoint(run.path, training_state(objects, dd, samples_seen=samples), keep=2)  # on rank 0
    ...
    teardown_distributed()  # once training succeeded: frees the DDP wrapper, then destroys the process group
"""

from advtrain.training import _validate as validators  # check, positive, in_range, eps_for_norm, ...
from advtrain.training._checkpoint import (
    ResumeError,
    checkpoint_files,
    load_latest_checkpoint,
    restore_training_state,
    save_checkpoint,
    training_state,
)
from advtrain.training._config import (
    ConfigError,
    RunConfig,
    choose,
    config_diff,
    from_dict,
    load_config,
    override,
    precision_for_device,
)
from advtrain.training._distributed import (
    Dist,
    all_mean,
    barrier,
    gather_per_rank,
    setup_distributed,
    teardown_distributed,
    wrap_ddp,
)
from advtrain.training._loop import (
    Every,
    autocast,
    check_finite,
    check_timm_model,
    log_due,
    make_mixup,
    quiet_set_vital,
    take,
)
from advtrain.training._metrics import (
    MetricsError,
    MetricsLog,
    TensorBoardSink,
    WandbSink,
    check_sinks,
    open_sinks,
    read_metrics,
    truncate_metrics,
)
from advtrain.training._plot import Panel, plot_metrics
from advtrain.training._progress import Progress, interactive, run_logger
from advtrain.training._rng import rng_state, seeded_host_rng, set_rng_state, stable_seed, step_generator
from advtrain.training._run_dir import RUN_FILES, RunDir, RunDirError, check_run_dir, environment_meta
from advtrain.training._timing import StepTimer, cycle
from advtrain.training._validate import (
    FieldError,
    check_data_counts,
    device_name,
    divisible,
    each,
    eps_for_norm,
    in_range,
    non_empty,
    non_negative,
    positive,
)

__all__ = [
    "ConfigError",
    "FieldError",
    "Dist",
    "Every",
    "MetricsError",
    "MetricsLog",
    "Panel",
    "Progress",
    "RUN_FILES",
    "ResumeError",
    "RunDir",
    "RunConfig",
    "RunDirError",
    "StepTimer",
    "TensorBoardSink",
    "WandbSink",
    "all_mean",
    "autocast",
    "barrier",
    "check_data_counts",
    "check_finite",
    "check_run_dir",
    "check_sinks",
    "check_timm_model",
    "checkpoint_files",
    "choose",
    "config_diff",
    "cycle",
    "device_name",
    "divisible",
    "each",
    "environment_meta",
    "eps_for_norm",
    "from_dict",
    "gather_per_rank",
    "in_range",
    "interactive",
    "load_config",
    "load_latest_checkpoint",
    "log_due",
    "make_mixup",
    "non_empty",
    "non_negative",
    "open_sinks",
    "override",
    "plot_metrics",
    "positive",
    "precision_for_device",
    "quiet_set_vital",
    "read_metrics",
    "restore_training_state",
    "rng_state",
    "run_logger",
    "save_checkpoint",
    "seeded_host_rng",
    "set_rng_state",
    "setup_distributed",
    "teardown_distributed",
    "stable_seed",
    "step_generator",
    "take",
    "training_state",
    "truncate_metrics",
    "validators",
    "wrap_ddp",
]
