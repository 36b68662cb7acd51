"""The command line both recipes' ``launch.py`` share: presets, overrides, --fresh, --dry-run, local or cluster runs.

A launcher gives its presets, the runs a config expands to (one, or a comparison's several, each in its own
``run.out_dir``) and how to run them locally; this module parses, checks every run before anything starts or is
submitted (the config, the batch split over the processes, and each run directory), and turns configuration and
run-directory errors into a one-line message and a non-zero exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import textwrap
import time
import typing
from collections.abc import Callable
from typing import Any

from advtrain.data import BadSampleError, ShardReadError
from advtrain.training import (
    ConfigError,
    MetricsError,
    ResumeError,
    RunDirError,
    check_run_dir,
    override,
    precision_for_device,
    teardown_distributed,
)
from recipes import cluster


def plain(doc: str) -> str:
    """A docstring for a terminal: RST roles and double backticks removed (``x`` -> x, :func:`f` -> f)."""
    return re.sub(r":\w+:`([^`]+)`", r"\1", doc).replace("``", "")


def config_keys(cls: type, *, width: int = 116) -> str:
    """The config's sections and their keys, compactly, for ``--help`` (a tuple of sections reads ``stages.N``)."""
    hints = typing.get_type_hints(cls)
    top, lines = [], []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if dataclasses.is_dataclass(tp):
            section, name = tp, f.name
        elif typing.get_origin(tp) is tuple and args and dataclasses.is_dataclass(args[0]):
            section, name = args[0], f"{f.name}.N"
        elif len(args) == 1 and dataclasses.is_dataclass(args[0]):
            section, name = args[0], f"{f.name} (null, or set it whole first)"
        else:
            top.append(f.name)
            continue
        keys = " ".join(g.name for g in dataclasses.fields(section))
        lines.append(textwrap.fill(keys, width=width, initial_indent=f"  {name}: ", subsequent_indent="      "))
        sub_hints = typing.get_type_hints(section)
        for g in dataclasses.fields(section):  # one level of nesting (stages.N.attack)
            if dataclasses.is_dataclass(sub_hints[g.name]):
                sub = " ".join(h.name for h in dataclasses.fields(sub_hints[g.name]))
                lines.append(
                    textwrap.fill(
                        sub,
                        width=width,
                        initial_indent=f"  {name.split(' ')[0]}.{g.name}: ",
                        subsequent_indent="      ",
                    )
                )
    if top:
        lines.insert(
            0, textwrap.fill(" ".join(top), width=width, initial_indent="  (top level): ", subsequent_indent="      ")
        )
    return "\n".join(lines)


def _overridden(items: list[str]) -> set[str]:
    return {item.split("=", 1)[0].strip() for item in items if "=" in item}


def parse(argv: list[str] | None, *, prog: str, doc: str, presets: dict, preset: Callable, example: str):
    """``(cfg, args)`` from a command line: ``--preset NAME [--fresh] [--dry-run] [cluster options] key=value ...``.

    A bad override exits with status 2 and one line on stderr naming the key, the value and what is allowed (no
    usage block); ``--help`` lists every config key.
    """
    cls = type(preset("embedded" if "embedded" in presets else min(presets)))
    epilog = (
        "config keys (override any as dotted.key=value; values are JSON, e.g. optim.lr=0.01, "
        'eval.pgd_steps=10, data.path="/data");\n--preset NAME --dry-run prints a preset\'s resolved values:\n'
        + config_keys(cls)
    )
    p = argparse.ArgumentParser(
        prog=prog,
        description=plain(doc).rstrip() + "\n\n" + epilog,
        usage="%(prog)s [--preset NAME] [--dry-run] [--fresh] [cluster options] [dotted.key=value ...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default="embedded", choices=sorted(presets), help="a named configuration")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config (all but the data and other files, which are not read) and print it "
        "resolved (with --cluster: also the job parameters and sbatch script); runs nothing",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="start over in run.out_dir: move an existing run's files (metrics, checkpoints, config) aside "
        "into a previous-<time> folder there (run.fresh=true)",
    )
    p.add_argument(
        "--world",
        type=int,
        default=None,
        help="processes (GPUs) the --dry-run memory estimate is for (default: WORLD_SIZE, or 1; with --cluster "
        "slurm: nodes x GPUs per node)",
    )
    p.add_argument("overrides", nargs="*", help=f"dotted.key=value (JSON values), e.g. {example}")
    cluster.add_cluster_args(p)
    args = p.parse_intermixed_args(argv)  # overrides before and after options: ... key=v --dry-run key2=w
    try:
        cfg = override(preset(args.preset), args.overrides + (["run.fresh=true"] if args.fresh else []))
    except ValueError as err:
        print(f"{prog}: configuration error: {err}", file=sys.stderr)
        sys.exit(2)
    args.explicit = _overridden(args.overrides)
    return cfg, args


def device_type(cfg, args: argparse.Namespace) -> str:
    """Where the run's processes will compute: ``cuda``/``cpu``/``mps`` (SLURM: GPUs asked for, or not)."""
    if getattr(args, "cluster", None) == "slurm":
        return "cuda" if args.gpus_per_node else "cpu"
    if cfg.run.device:
        return cfg.run.device.split(":")[0]
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def for_device(cfg, args: argparse.Namespace):
    """``cfg`` with ``run.precision`` fit for the device (bf16 -> fp32 on CPU unless asked); prints the notice."""
    precision, notice = precision_for_device(
        cfg.run.precision,
        device_type=device_type(cfg, args),
        explicit="run.precision" in getattr(args, "explicit", set()),
    )
    if notice:
        print(notice, file=sys.stderr)
    if precision == cfg.run.precision:
        return cfg
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, precision=precision))


def check_runs(cfgs: list, world: int, *, validate: Callable, files: bool = True) -> list[str]:
    """Raises ``ValueError`` (or ``FileNotFoundError``) for a run that cannot train with ``world`` processes, or
    whose run directory holds a run with another config (the differing fields named).

    With ``files=False`` (a dry run) a missing data path or file is not an error: the messages come back instead.
    """
    skipped = []
    for c in cfgs:
        try:
            validate(c)
        except FileNotFoundError as err:
            if files:
                raise
            skipped.append(str(err))
        if c.data.batch_size % world:
            raise ValueError(
                f"data.batch_size ({c.data.batch_size}) is the global batch: it must divide evenly over "
                f"{world} processes"
            )
        check_run_dir(c.run.out_dir, c.to_dict(), fresh=c.run.fresh)
    return skipped


def dry_run_note(skipped: list[str]) -> str:
    """The dry run's one line on what it did not check."""
    if not skipped:
        return "dry run: config checked; nothing was run"
    return (
        f"dry run: config checked, the data and other files not read ({'; '.join(dict.fromkeys(skipped))}); "
        "nothing was run"
    )


def dry_run_world(args: argparse.Namespace) -> int:
    """The world size a dry run sizes memory for: ``--world``, else SLURM's nodes x GPUs, else WORLD_SIZE or 1."""
    import os

    if getattr(args, "world", None):
        return int(args.world)
    if getattr(args, "cluster", None) == "slurm" and getattr(args, "gpus_per_node", 0):
        return int(args.nodes) * int(args.gpus_per_node)
    return int(os.environ.get("WORLD_SIZE", "1"))


def memory_lines(
    model: str,
    sizes: list[int],
    *,
    batch: int,
    world: int,
    run,
    num_classes: int,
    kwargs: dict | None = None,
    ema: bool = False,
) -> list[str]:
    """The per-GPU memory estimate (``advtrain.parallel.estimate_memory``) of a run at each training size.

    One line per distinct size, for ``run.parallel``, ``run.activation_checkpointing`` and ``run.precision``,
    with an fp32 EMA copy when ``ema``; a model the estimate cannot build gives one line that says why.
    """
    from advtrain.parallel import estimate_memory, format_memory_estimate

    if batch % world:
        return [f"memory estimate: data.batch_size {batch} does not divide over {world} processes"]
    out = []
    for size in dict.fromkeys(sizes):
        try:
            e = estimate_memory(
                model,
                img_size=size,
                batch_per_gpu=batch // world,
                world=world,
                parallel=run.parallel,
                activation_checkpointing=run.activation_checkpointing,
                precision=run.precision,
                num_classes=num_classes,
                model_kwargs=kwargs or {},
                ema=ema,
            )
        except Exception as err:  # noqa: BLE001 - an estimate is advice: never stop a dry run for it
            return out + [f"memory estimate unavailable for {model}: {type(err).__name__}: {err}"]
        out.append("memory per GPU: " + format_memory_estimate(e))
    return out


def main(
    recipe: str,
    cfg,
    args: argparse.Namespace,
    *,
    check: Callable,
    run_local: Callable[[Any], Any],
    memory: Callable[[Any, int], list[str]] | None = None,
) -> None:
    """Runs (or submits, or prints) ``cfg`` as ``args`` say; errors a user can fix exit with one line.

    ``memory(cfg, world)``: the dry run's per-GPU memory estimate lines (printed to stderr, after the config).
    """
    if args.dry_run and memory is not None:  # the job's precision, before a CPU machine's bf16 -> fp32 fallback
        args.memory_report = memory(cfg, dry_run_world(args))
    cfg = for_device(cfg, args)
    if args.cluster:
        for line in getattr(args, "memory_report", []):
            print(line, file=sys.stderr)
        cluster.main_or_exit(recipe, cfg, args, check=check)
        return
    if args.dry_run:
        try:
            skipped = check(cfg, 1, files=False)
        except (ValueError, FileNotFoundError) as err:
            sys.exit(f"configuration error: {err}")
        print(json.dumps(cfg.to_dict(), indent=2))
        for line in getattr(args, "memory_report", []):
            print(line, file=sys.stderr)
        print(dry_run_note(skipped or []), file=sys.stderr)
        return
    try:
        check(cfg, 1)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"configuration error: {err}")
    start = time.perf_counter()
    try:
        run_local(cfg)
    # found once training set up (a bad-sample budget exceeded, an unreadable shard): one line, no traceback
    except (RunDirError, ResumeError, MetricsError, ConfigError, BadSampleError, ShardReadError) as err:
        sys.exit(f"error: {err}")
    teardown_distributed()  # a DDP wrapper left to the interpreter's exit can abort a finished job
    print(f"total wall-clock: {time.perf_counter() - start:.0f} s")
