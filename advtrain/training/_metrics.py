"""Metrics as JSON lines (one dict a line), their truncation on resume, and optional TensorBoard / W&B sinks."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol


class MetricsError(ValueError):
    """A metrics file that cannot be read (a damaged line before its last)."""


def _parse(path: Path, log: Callable[[str], None] | None) -> tuple[list[dict], bool]:
    """The rows of a JSON-lines file and whether a torn last line (a crash mid-write) was left out."""
    if not path.exists():
        return [], False
    lines = [(i + 1, line) for i, line in enumerate(path.read_text().splitlines()) if line.strip()]
    rows = []
    for n, (lineno, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if n == len(lines) - 1:
                if log is not None:
                    log(f"{path}: dropped a torn last line {lineno} (a crash mid-write?): {line[:60]!r}")
                return rows, True
            raise MetricsError(
                f"{path}:{lineno} is not a JSON line ({err.msg}): {line[:60]!r}; fix or move the file aside"
            ) from None
    return rows, False


def read_metrics(path: str | Path, *, log: Callable[[str], None] | None = None) -> list[dict]:
    """The rows of a metrics JSON-lines file ([] when it does not exist); a torn last line is left out.

    Raises:
        MetricsError: a line other than the last is not JSON.
    """
    return _parse(Path(path), log)[0]


def truncate_metrics(path: str | Path, samples: int, *, log: Callable[[str], None]) -> int:
    """Keeps the rows logged at or before ``samples`` (a resumed checkpoint's); returns how many were dropped.

    A preempted run logged steps past its last checkpoint, and the resumed run logs them again; without this the
    file would hold them twice. A torn last line (a crash mid-write) is dropped too, with a message naming the
    file. The file is rewritten atomically (temp file, then rename).

    Raises:
        MetricsError: a line other than the last is not JSON.
    """
    path = Path(path)
    rows, torn = _parse(path, log)
    keep = [r for r in rows if r.get("samples", 0) <= samples]
    if len(keep) != len(rows) or torn:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, path)
    if len(keep) != len(rows):
        log(f"dropped {len(rows) - len(keep)} metric lines logged after that checkpoint (they are logged again)")
    return len(rows) - len(keep) + int(torn)


def _scalars(row: dict) -> dict[str, float]:
    kind = row.get("kind", "metrics")
    return {
        f"{kind}/{k}": float(v)
        for k, v in row.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("samples", "step") and math.isfinite(v)
    }


class Sink(Protocol):
    """Anything that takes scalars at a global step (the samples seen) beside the JSON lines."""

    def write(self, scalars: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    """TensorBoard event files in ``log_dir`` (``torch.utils.tensorboard``; the ``tensorboard`` extra).

    Tags are ``<kind>/<key>`` (``train/loss``, ``eval/clean``), the global step is the samples seen.

    Raises:
        ImportError: tensorboard is not installed; the one-line message names the extra.
    """

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("run.tensorboard needs TensorBoard: pip install 'advtrain[tensorboard]'") from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A Weights & Biases run (the ``wandb`` extra); a resumed run appends to the same W&B run.

    The W&B run id is derived from the run directory and kept in ``<run_dir>/wandb-id.txt``, so a fresh start
    (which moves that file aside) starts a new W&B run.

    Args:
        run_dir: the run directory (W&B writes its files under it).
        project: the W&B project.
        config: the run's config as plain data.

    Raises:
        ImportError: wandb is not installed; the one-line message names the extra.
    """

    def __init__(self, run_dir: str | Path, *, project: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise ImportError("run.wandb needs Weights & Biases: pip install 'advtrain[wandb]'") from None
        run_dir = Path(run_dir)
        id_file = run_dir / "wandb-id.txt"
        if not id_file.exists():
            id_file.write_text(
                hashlib.blake2b(f"{run_dir.resolve()}:{os.getpid()}".encode(), digest_size=8).hexdigest()
            )
        self.run = wandb.init(
            project=project,
            name=run_dir.name,
            id=id_file.read_text().strip(),
            resume="allow",
            dir=str(run_dir),
            config=config,
        )

    def write(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsLog:
    """Appends metric rows to a JSON-lines file, flushed per row, and passes their scalars to the sinks.

    A row is a dict with ``kind`` (``"train"``, ``"eval"``) and ``samples`` (the global step for the sinks).
    Only the main process writes: ``enabled=False`` (other ranks) makes every call a no-op.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "metrics.jsonl"
        >>> with MetricsLog(path) as m:
        ...     m.write({"kind": "train", "samples": 64, "loss": 2.3})
        >>> read_metrics(path)
        [{'kind': 'train', 'samples': 64, 'loss': 2.3}]
    """

    def __init__(self, path: str | Path, *, sinks: tuple[Sink, ...] = (), enabled: bool = True):
        self.enabled, self.sinks = enabled, tuple(sinks)
        self.file = Path(path).open("a") if enabled else None

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for sink in self.sinks:
            sink.write(_scalars(row), int(row.get("samples", 0)))

    def close(self) -> None:
        if self.file is not None and not self.file.closed:
            self.file.close()
            for sink in self.sinks:
                sink.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_sinks(run_dir: str | Path, *, tensorboard: bool, wandb: str | None, config: dict) -> tuple[Sink, ...]:
    """The sinks a run's config asks for: TensorBoard under ``<run_dir>/tensorboard``, and/or a W&B project."""
    sinks: list[Sink] = []
    if tensorboard:
        sinks.append(TensorBoardSink(Path(run_dir) / "tensorboard"))
    if wandb:
        sinks.append(WandbSink(run_dir, project=wandb, config=config))
    return tuple(sinks)


def check_sinks(*, tensorboard: bool, wandb: str | None) -> None:
    """Raises a one-line ``ValueError`` naming the extra to install when an asked-for sink's library is missing."""
    import importlib.util

    for wanted, module, extra, key in (
        (tensorboard, "tensorboard", "tensorboard", "run.tensorboard=true"),
        (wandb, "wandb", "wandb", "run.wandb"),
    ):
        if wanted and importlib.util.find_spec(module) is None:
            raise ValueError(f"{key} needs the {module!r} package: pip install 'advtrain[{extra}]'")
