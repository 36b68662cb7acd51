"""The command line both recipes' ``launch.py`` share: presets, overrides, --fresh, --dry-run, local or cluster runs.

A launcher gives its presets, the runs a config expands to (one, or a comparison's several, each in its own
``run.out_dir``) and how to run them locally; this module parses, checks every run before anything starts or is
submitted (the config, the batch split over the processes, and each run directory), and turns configuration and
run-directory errors into a one-line message and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable

from advtrain.training import ConfigError, MetricsError, ResumeError, RunDirError, check_run_dir, override
from recipes import cluster


def parse(argv: list[str] | None, *, prog: str, doc: str, presets: dict, preset: Callable, example: str):
    """``(cfg, args)`` from a command line: ``--preset NAME [--fresh] [--dry-run] [cluster options] key=value ...``."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="embedded", choices=sorted(presets), help="a named configuration")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config (with --cluster: also the job parameters and sbatch script), exit")
    p.add_argument("--fresh", action="store_true",
                   help="start over in run.out_dir: move an existing run's files (metrics, checkpoints, config) aside "
                        "into a previous-<time> folder there (run.fresh=true)")
    p.add_argument("overrides", nargs="*", help=f"dotted.key=value (JSON values), e.g. {example}")
    cluster.add_cluster_args(p)
    args = p.parse_args(argv)
    try:
        cfg = override(preset(args.preset), args.overrides + (["run.fresh=true"] if args.fresh else []))
    except ValueError as err:
        p.error(str(err))
    return cfg, args


def check_runs(cfgs: list, world: int, *, validate: Callable) -> None:
    """Raises ``ValueError`` (or ``FileNotFoundError``) for a run that cannot train with ``world`` processes, or
    whose run directory holds a run with another config (the differing fields named)."""
    for c in cfgs:
        validate(c)
        if c.data.batch_size % world:
            raise ValueError(f"data.batch_size ({c.data.batch_size}) is the global batch: it must divide evenly over "
                             f"{world} processes")
        check_run_dir(c.run.out_dir, c.to_dict(), fresh=c.run.fresh)


def main(recipe: str, cfg, args: argparse.Namespace, *, check: Callable, run_local: Callable[[Any], Any]) -> None:
    """Runs (or submits, or prints) ``cfg`` as ``args`` say; errors a user can fix exit with one line."""
    if args.cluster:
        cluster.main_or_exit(recipe, cfg, args, check=check)
        return
    if args.dry_run:
        print(json.dumps(cfg.to_dict(), indent=2))
        return
    try:
        check(cfg, 1)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"configuration error: {err}")
    start = time.perf_counter()
    try:
        run_local(cfg)
    except (RunDirError, ResumeError, MetricsError, ConfigError) as err:  # found once training set up: no traceback
        sys.exit(f"error: {err}")
    print(f"total wall-clock: {time.perf_counter() - start:.0f} s")
