"""Submit a recipe to SLURM (or to submitit's local executor) and follow it: ``--cluster slurm|local``.

Both recipes' ``launch.py`` call :func:`add_cluster_args` and :func:`launch`. The job object is
:class:`RecipeJob`, MAE-style: ``__call__`` sets up ``torch.distributed`` from the SLURM/submitit environment and
trains (one process per GPU, or the requested CPU tasks), and ``checkpoint()`` hands submitit the same job again, so
that on preemption or time-out it is requeued and resumes from the run directory's latest checkpoint.

    python -m recipes.advxl.launch --cluster slurm --partition gpu --nodes 2 --gpus-per-node 8 \\
        --cpus-per-task 12 --time 2880 --account proj --preset imagenet_vit_b16 data.path=/datasets/imagenet

Job ids and log paths are printed. Unless ``--detach`` is given the launcher follows the job until it ends,
prints the state changes and the run's results table, and exits non-zero with the job's error and the tail of
its log if training raised. ``--dry-run`` prints the resolved config, the executor parameters and the sbatch
script, and submits nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

__all__ = [
    "add_cluster_args",
    "launch",
    "RecipeJob",
    "executor_parameters",
    "absolute_paths",
    "sbatch_script",
    "follow",
    "JobFailed",
]


class JobFailed(RuntimeError):
    """A submitted job ended without a result: its error and the tail of its log are in the message."""


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    """Adds ``--cluster`` and the resource options (nodes, GPUs, CPUs, partition, time, account, sbatch extras)."""
    g = p.add_argument_group("cluster (submitit)", "without --cluster the job runs in this process")
    g.add_argument(
        "--cluster",
        choices=("local", "slurm"),
        default=None,
        help="submit through submitit: 'slurm' (sbatch) or 'local' (the same job object on this machine)",
    )
    g.add_argument("--nodes", type=int, default=1, help="SLURM nodes")
    g.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one training process per GPU")
    g.add_argument(
        "--tasks-per-node",
        type=int,
        default=None,
        help="processes per node (default: --gpus-per-node, or 1 on CPU); >1 on CPU trains with gloo DDP",
    )
    g.add_argument(
        "--cpus-per-task",
        type=int,
        default=None,
        help="CPU cores per process (data loading, CPU math; default: data.num_workers + 1)",
    )
    g.add_argument("--mem-gb", type=int, default=None, help="memory per node in GiB (default: the cluster's)")
    g.add_argument("--partition", default=None, help="SLURM partition")
    g.add_argument("--account", default=None, help="SLURM account to charge")
    g.add_argument(
        "--time",
        type=int,
        default=60,
        metavar="MINUTES",
        help="time limit per allocation; on time-out the job is requeued from its latest checkpoint",
    )
    g.add_argument("--max-requeues", type=int, default=3, help="time-outs after which the job is not requeued again")
    g.add_argument("--job-name", default=None, help="job name (default: the recipe's name)")
    g.add_argument(
        "--job-dir",
        default=None,
        help="submitit's folder for pickles and logs (default: <run.out_dir>/submitit); must be on a "
        "filesystem the nodes share",
    )
    g.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra #SBATCH parameter, repeatable, e.g. --sbatch qos=high --sbatch constraint=a100",
    )
    g.add_argument("--detach", action="store_true", help="print the job id and log paths and return at once")


def _extra(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--sbatch takes KEY=VALUE (e.g. qos=high), got {item!r}")
        out[key.strip().lstrip("-").replace("-", "_")] = value.strip()
    return out


def executor_parameters(args: argparse.Namespace, *, name: str, cfg=None) -> dict[str, Any]:
    """submitit ``AutoExecutor.update_parameters`` keywords from the command-line options.

    Without ``--cpus-per-task``, a process asks for the config's ``data.num_workers`` loader workers plus one core
    for itself (when ``cfg`` is given).

    Example:
        >>> import argparse
        >>> p = argparse.ArgumentParser(); add_cluster_args(p)
        >>> a = p.parse_args(["--cluster", "slurm", "--gpus-per-node", "8", "--partition", "gpu"])
        >>> params = executor_parameters(a, name="advxl")
        >>> params["tasks_per_node"], params["slurm_partition"]
        (8, 'gpu')
    """
    for opt, least in (("nodes", 1), ("gpus_per_node", 0), ("time", 1), ("max_requeues", 0)):
        if getattr(args, opt) < least:
            raise ValueError(f"--{opt.replace('_', '-')} must be >= {least}, got {getattr(args, opt)}")
    tasks = args.tasks_per_node if args.tasks_per_node is not None else max(1, args.gpus_per_node)
    if tasks < 1:
        raise ValueError(f"--tasks-per-node must be >= 1, got {tasks}")
    if args.gpus_per_node and tasks != args.gpus_per_node:
        raise ValueError(
            f"one process per GPU: --tasks-per-node ({tasks}) must equal --gpus-per-node ({args.gpus_per_node})"
        )
    if args.cluster == "local" and args.nodes != 1:
        raise ValueError(f"--cluster local runs on this machine: --nodes must be 1, got {args.nodes}")
    params: dict[str, Any] = dict(
        name=args.job_name or name, timeout_min=args.time, nodes=args.nodes, tasks_per_node=tasks
    )
    if args.gpus_per_node:  # never "--gpus-per-node=0": a cluster without GPU gres rejects it
        params["gpus_per_node"] = args.gpus_per_node
    if args.cpus_per_task is not None:
        params["cpus_per_task"] = args.cpus_per_task
    elif cfg is not None and getattr(getattr(cfg, "data", None), "num_workers", None) is not None:
        params["cpus_per_task"] = cfg.data.num_workers + 1  # the loader's workers and the training process
    if args.cluster == "slurm":
        if args.mem_gb is not None:
            params["mem_gb"] = args.mem_gb
        if args.partition:
            params["slurm_partition"] = args.partition
        if args.account:
            params["slurm_account"] = args.account
        extra = _extra(args.sbatch)
        if extra:
            params["slurm_additional_parameters"] = extra
    elif args.partition or args.account or args.sbatch or args.mem_gb is not None:
        raise ValueError("--partition, --account, --mem-gb and --sbatch apply to --cluster slurm only")
    return params


def absolute_paths(cfg):
    """The config with ``run.out_dir`` and an existing relative ``data.path`` made absolute.

    A job runs in another process, perhaps on another node: relative paths would resolve against its working
    directory, not the one the user launched from.
    """
    run = dataclasses.replace(cfg.run, out_dir=str(Path(cfg.run.out_dir).resolve()))
    data = cfg.data
    path = getattr(data, "path", None)
    if path and not os.path.isabs(path) and Path(path).exists():
        data = dataclasses.replace(data, path=str(Path(path).resolve()))
    finetune = getattr(cfg, "finetune", None)  # a two-phase job's second data section (recipes.advxl)
    if finetune is not None and not os.path.isabs(finetune.data.path or "/") and Path(finetune.data.path).exists():
        finetune = dataclasses.replace(
            finetune, data=dataclasses.replace(finetune.data, path=str(Path(finetune.data.path).resolve()))
        )
        return dataclasses.replace(cfg, run=run, data=data, finetune=finetune)
    return dataclasses.replace(cfg, run=run, data=data)


def _summary(result: Any) -> Any:
    """A job's return value without tensors (weights stay in the run directory's checkpoints)."""
    import torch

    if isinstance(result, dict):
        return {k: _summary(v) for k, v in result.items() if k != "final_weights"}
    if isinstance(result, (list, tuple)):
        return type(result)(_summary(v) for v in result)
    if isinstance(result, torch.Tensor):
        return result.tolist()
    return result


class RecipeJob:
    """The submitted callable: distributed set-up from the job environment, then the recipe's ``run_local``.

    Args:
        recipe: ``"advxl"`` or ``"fast_advprop"`` (the module ``recipes.<recipe>.launch``).
        cfg: the resolved config, with absolute paths.
    """

    def __init__(self, recipe: str, cfg) -> None:
        self.recipe, self.cfg = recipe, cfg

    def __call__(self) -> Any:
        import submitit

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            # MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK for init_process_group(init_method="env://"); the
            # recipe picks cuda:LOCAL_RANK itself, so every process keeps seeing all of the node's GPUs
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        print(
            f"[cluster] job {env.job_id} task {env.global_rank}/{env.num_tasks} on {env.hostname}; "
            f"run directory {self.cfg.run.out_dir}",
            flush=True,
        )
        launch_module = importlib.import_module(f"recipes.{self.recipe}.launch")
        summary = _summary(launch_module.run_local(self.cfg))
        from advtrain.training import teardown_distributed

        teardown_distributed()  # frees the DDP wrapper before the process group and the interpreter go
        return summary

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit on preemption or time-out: requeue the same job; it resumes from the latest checkpoint."""
        import submitit

        print(
            f"[cluster] preempted or timed out: requeueing; the run resumes from the latest checkpoint in "
            f"{self.cfg.run.out_dir}",
            flush=True,
        )
        # a requeued job resumes: a --fresh start applies to the first allocation only
        cfg = (
            dataclasses.replace(self.cfg, run=dataclasses.replace(self.cfg.run, fresh=False))
            if getattr(self.cfg.run, "fresh", False)
            else self.cfg
        )
        return submitit.helpers.DelayedSubmission(RecipeJob(self.recipe, cfg))


def _executor(args: argparse.Namespace, folder: Path, params: dict):
    """submitit's executor. A dry run renders the sbatch script on any machine: submitit refuses to build a SLURM
    executor where ``srun`` is missing (a laptop), so for a dry run that check is bypassed while it is built."""
    import submitit
    from submitit.slurm.slurm import SlurmExecutor

    preview = args.dry_run and args.cluster == "slurm" and shutil.which("srun") is None
    bypass = mock.patch.object(SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    with bypass if preview else contextlib.nullcontext():
        ex = submitit.AutoExecutor(folder=folder, cluster=args.cluster, slurm_max_num_timeout=args.max_requeues)
    ex.update_parameters(**params)
    return ex


def sbatch_script(executor) -> str:
    """The sbatch script submitit would submit for ``executor`` (a thin wrapper over submitit internals)."""
    inner = executor._executor
    return inner._make_submission_file_text(inner._submitit_command_str, "dry-run")


def _tail(text: str | None, lines: int = 30) -> str:
    return "\n".join((text or "").rstrip().splitlines()[-lines:])


def follow(job, *, poll_s: float = 2.0, out=print) -> Any:
    """Waits for ``job``, printing state changes; returns its result or raises :class:`JobFailed`.

    A ``KeyboardInterrupt`` stops following, not the job.
    """
    last = None
    try:
        while not job.done():
            state = job.state
            if state != last:
                out(f"[cluster] job {job.job_id}: {state}")
                last = state
            time.sleep(poll_s)
    except KeyboardInterrupt:
        out(f"[cluster] stopped following; job {job.job_id} keeps running. Logs: {job.paths.stdout}")
        raise
    try:
        result = job.results()[0]  # rank 0's (every task returns; a multi-task job has no single result())
    except Exception as err:  # submitit raises FailedJobError/UncompletedJobError with the job's traceback
        raise JobFailed(
            f"job {job.job_id} failed ({job.state}):\n{err}\n\n--- tail of {job.paths.stderr} ---\n"
            f"{_tail(job.stderr())}"
        ) from err
    out(f"[cluster] job {job.job_id}: finished")
    return result


def launch(recipe: str, cfg, args: argparse.Namespace, *, check) -> Any:
    """Submits ``recipe`` with ``cfg`` as the command-line options say; follows it unless ``--detach``.

    Args:
        recipe: ``"advxl"`` or ``"fast_advprop"``.
        cfg: the resolved config.
        args: the parsed command line (with :func:`add_cluster_args`'s options).
        check: ``check(cfg, world)`` raises ``ValueError`` for a configuration that cannot run with ``world``
            processes; called before anything is submitted.

    Returns:
        The job's result (the recipe's summary dict) when followed, else the submitit job.
    """
    params = executor_parameters(args, name=recipe, cfg=cfg)
    world = params["nodes"] * params["tasks_per_node"]
    cfg = absolute_paths(cfg)
    skipped = check(cfg, world, files=False) if args.dry_run else check(cfg, world)  # a preview needs no data
    folder = Path(args.job_dir).resolve() if args.job_dir else Path(cfg.run.out_dir) / "submitit"
    try:
        executor = _executor(args, folder, params)
    except RuntimeError as err:  # submitit: no srun on this machine
        raise JobFailed(
            f"could not set up a {args.cluster} submission of {recipe}: {err} (run this on a login node "
            "of the cluster; --dry-run prints the sbatch script anywhere)"
        ) from err
    if args.dry_run:
        print(
            json.dumps(
                {
                    "cluster": args.cluster,
                    "world_size": world,
                    "job_dir": str(folder),
                    "executor": params,
                    "config": cfg.to_dict(),
                },
                indent=2,
            )
        )
        if args.cluster == "slurm":
            print("\n# sbatch script that would be submitted:\n" + sbatch_script(executor))
        from recipes.cli import dry_run_note

        print(dry_run_note(skipped or []).replace("nothing was run", "nothing was submitted"), file=sys.stderr)
        return None
    folder.mkdir(parents=True, exist_ok=True)
    try:
        job = executor.submit(RecipeJob(recipe, cfg))
    except Exception as err:  # sbatch missing, controller down, a partition or account it refuses...
        hint = " Is SLURM reachable from here (`sinfo`)?" if args.cluster == "slurm" else ""
        raise JobFailed(f"could not submit the {recipe} job ({type(err).__name__}): {str(err).strip()}.{hint}") from err
    print(
        f"[cluster] submitted {recipe} as job {job.job_id} ({args.cluster}, {world} process"
        f"{'es' if world > 1 else ''})\n[cluster] stdout: {job.paths.stdout}\n[cluster] stderr: {job.paths.stderr}"
        f"\n[cluster] run directory: {cfg.run.out_dir}",
        flush=True,
    )
    if args.detach:
        if args.cluster == "slurm":
            print(f"[cluster] follow: squeue -j {job.job_id}; tail -f {job.paths.stdout}; cancel: scancel {job.job_id}")
        return job
    result = follow(job)
    for name in ("comparison.md", "results.md"):  # the recipe's own table, as the in-process launch prints it
        table = Path(cfg.run.out_dir) / name
        if table.exists():
            print(f"\n{table}:\n{table.read_text()}")
            break
    return result


def main_or_exit(recipe: str, cfg, args: argparse.Namespace, *, check) -> None:
    """:func:`launch` for a command line: configuration errors and failed jobs exit non-zero with their message."""
    try:
        launch(recipe, cfg, args, check=check)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"configuration error: {err}")
    except JobFailed as err:
        sys.exit(str(err))
    except KeyboardInterrupt:
        sys.exit(130)
