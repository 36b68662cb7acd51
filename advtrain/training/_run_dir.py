"""A run directory: its config and provenance, resume or refusal, a fresh start that moves old files aside."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from advtrain.training._checkpoint import checkpoint_files, load_latest_checkpoint
from advtrain.training._config import config_diff
from advtrain.training._distributed import Dist, barrier
from advtrain.training._metrics import MetricsLog, Sink, truncate_metrics

# what a run writes into its directory; a fresh start moves these aside (never the submitit folder or others)
RUN_FILES = (
    "config.json",
    "meta.json",
    "metrics.jsonl",
    "metrics.png",
    "results.md",
    "checkpoints",
    "tensorboard",
    "wandb",
    "wandb-id.txt",
    "resolution.md",
    "resolution.png",
)


class RunDirError(ValueError):
    """A run directory that this run may not write into or resume from; the one-line message says what to do."""


def check_run_dir(
    run_dir: str | Path, config: dict, *, fresh: bool = False, ignore: tuple[str, ...] = ("run.fresh", "run.out_dir")
) -> None:
    """Refuses a run directory that holds a run with another config, naming the fields that differ.

    Read-only: launchers call it before they start or submit anything. With ``fresh`` any old run is moved aside
    later (:meth:`RunDir.prepare`), so nothing is refused. Not compared: ``ignore`` (``run.fresh``, and
    ``run.out_dir``, which is this directory however it is spelled), fields that only one side has (a config saved
    by an older version of the recipe), and paths spelled differently that name the same file (a launcher makes
    ``data.path`` absolute for a cluster job).

    Raises:
        RunDirError: e.g. ``runs/x holds a run with a different config: optim.lr 0.001 -> 0.002; use another
            run.out_dir or --fresh (run.fresh=true)``.
    """
    saved = Path(run_dir) / "config.json"
    if fresh or not saved.exists():
        return
    try:
        old = json.loads(saved.read_text())
    except json.JSONDecodeError as err:
        raise RunDirError(f"{saved} is not JSON ({err.msg}); use another run.out_dir or --fresh") from None
    diff = config_diff(old, config, ignore=ignore, missing_ok=True)
    if diff:
        more = f" (+{len(diff) - 8} more)" if len(diff) > 8 else ""
        raise RunDirError(
            f"{run_dir} holds a run with a different config: {', '.join(diff[:8])}{more}; use another "
            f"run.out_dir or --fresh (run.fresh=true)"
        )


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment_meta(*, source: str | Path | None = None, **packages: str | tuple[str, ...]) -> dict:
    """Provenance for ``meta.json``: git revision and dirtiness of ``source``'s checkout, the command, versions.

    Args:
        source: a file or folder inside the git checkout to describe (default: this package's).
        **packages: meta key -> distribution name (or names, the first installed one wins) whose version to
            record, beside torch, timm and advtrain.
    """
    cwd = Path(source or __file__)
    cwd = cwd if cwd.is_dir() else cwd.parent
    try:
        rev = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=cwd, timeout=10
            ).stdout.strip()
            or "unknown"
        )
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain"], capture_output=True, text=True, cwd=cwd, timeout=10
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        rev, dirty = "unknown", False
    import torch

    import advtrain

    meta = {
        "git_revision": rev,
        "git_dirty": dirty,
        "command": sys.argv,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": _version("timm"),
        "advtrain": advtrain.__version__,
        "host": platform.node(),
        "cuda": torch.version.cuda,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }
    for key, names in packages.items():
        meta[key] = next(filter(None, map(_version, (names,) if isinstance(names, str) else names)), None)
    return meta


class RunDir:
    """A run directory as one training run uses it: config and provenance, resume, metrics.

    Layout: ``config.json`` (the resolved config), ``meta.json`` (provenance), ``metrics.jsonl``,
    ``checkpoints/ckpt-<samples>.pt`` (+ ``.sha256``), and what the recipe adds (plots, tables). Every rank
    makes the same calls; only rank 0 writes.

    Args:
        path: the directory.
        dd: this process.
        log: where messages go (rank 0's console).
    """

    def __init__(self, path: str | Path, *, dd: Dist, log: Callable[[str], None]):
        self.path, self.dd, self.log = Path(path), dd, log

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def prepare(
        self, config: dict, *, meta: dict, fresh: bool = False, ignore: tuple[str, ...] = ("run.fresh", "run.out_dir")
    ) -> None:
        """Checks the config against a saved one, moves an old run aside when ``fresh``, writes config and meta.

        A collective (it ends with a barrier): every rank calls it before reading the directory.

        Raises:
            RunDirError: the directory holds a run with another config (and not ``fresh``).
        """
        check_run_dir(self.path, config, fresh=fresh, ignore=ignore)
        if self.dd.main:
            self.path.mkdir(parents=True, exist_ok=True)
            if fresh:
                self._move_aside()
            (self.path / "config.json").write_text(json.dumps(config, indent=2))
            (self.path / "meta.json").write_text(json.dumps(meta, indent=2))
        barrier(self.dd)

    def _move_aside(self) -> None:
        present = [name for name in RUN_FILES if (self.path / name).exists()]
        if not present:
            return
        dest = self.path / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
        n = 1
        while dest.exists():
            dest, n = self.path / f"previous-{time.strftime('%Y%m%d-%H%M%S')}-{n}", n + 1
        dest.mkdir()
        for name in present:
            shutil.move(str(self.path / name), str(dest / name))
        self.log(f"fresh start: moved the previous run's {', '.join(present)} to {dest}")

    def resume(self) -> dict | None:
        """The newest usable checkpoint (None for a new run); the metrics file is cut back to it.

        A directory with metrics or checkpoint files but no usable checkpoint is refused: starting over there
        would log every step twice into the old metrics. ``run.fresh=true`` moves them aside instead.

        Raises:
            RunDirError: metrics or checkpoints exist, but no checkpoint is usable.
        """
        state = load_latest_checkpoint(self.path, self.log)
        if state is None:
            left = [p.name for p in (self.metrics_path,) if p.exists() and p.stat().st_size]
            left += [f"{len(checkpoint_files(self.path))} checkpoint file(s)"] if checkpoint_files(self.path) else []
            if left:
                raise RunDirError(
                    f"{self.path} holds {' and '.join(left)} but no usable checkpoint to resume from; "
                    f"start over with --fresh (run.fresh=true: the old files are moved aside) or use "
                    f"another run.out_dir"
                )
        elif self.dd.main:
            truncate_metrics(self.metrics_path, state["samples_seen"], log=self.log)
        return state

    def metrics(self, *, sinks: tuple[Sink, ...] = ()) -> MetricsLog:
        """The metrics log (appending; a no-op on ranks other than 0)."""
        return MetricsLog(self.metrics_path, sinks=sinks, enabled=self.dd.main)
