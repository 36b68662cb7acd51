"""Checkpoints: atomic writes with a sha256 sidecar, keep-last-k, ``weights_only`` loads, per-rank state."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from advtrain.training._distributed import Dist, gather_per_rank
from advtrain.training._rng import rng_state, set_rng_state


class ResumeError(ValueError):
    """A checkpoint that this run cannot resume from (another world size, missing entries)."""


def save_checkpoint(run_dir: str | Path, state: dict, *, keep: int) -> Path:
    """Writes ``checkpoints/ckpt-<samples_seen>.pt`` atomically with a sha256 sidecar; keeps the newest ``keep``.

    The bytes go to a temp file that is then renamed, so a crash mid-write leaves the previous checkpoints
    intact; the sidecar lets :func:`load_latest_checkpoint` tell a complete file from a damaged one.

    Args:
        run_dir: the run directory.
        state: a dict of tensors and plain values (it must load with ``weights_only=True``), with an int
            ``"samples_seen"`` (the file name).
        keep: how many checkpoints to keep (>= 1), newest first.

    Returns:
        The checkpoint's path.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1; got {keep}")
    ckdir = Path(run_dir) / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    path = ckdir / f"ckpt-{state['samples_seen']:012d}.pt"
    for target, payload in ((path, data), (path.with_suffix(".sha256"), hashlib.sha256(data).hexdigest().encode())):
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_bytes(payload)
        os.replace(tmp, target)
    for old in sorted(ckdir.glob("ckpt-*.pt"))[:-keep]:
        old.unlink(missing_ok=True)
        old.with_suffix(".sha256").unlink(missing_ok=True)
    return path


def checkpoint_files(run_dir: str | Path) -> list[Path]:
    """The run directory's checkpoint files, oldest first."""
    return sorted((Path(run_dir) / "checkpoints").glob("ckpt-*.pt"))


def load_latest_checkpoint(run_dir: str | Path, log: Callable[[str], None]) -> dict | None:
    """The newest checkpoint whose bytes match its sha256 and that loads with ``weights_only=True``; None if none.

    A truncated or corrupt file is reported through ``log`` and skipped for the one before it. Whether a run
    may start afresh when none is usable is the caller's decision (:meth:`RunDir.resume` refuses).
    """
    for path in reversed(checkpoint_files(run_dir)):
        try:
            data = path.read_bytes()
            sidecar = path.with_suffix(".sha256")
            if not sidecar.exists() or sidecar.read_text().strip() != hashlib.sha256(data).hexdigest():
                raise ValueError("sha256 mismatch (truncated or corrupt)")
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            log(f"resuming from {path} ({state['samples_seen']} samples seen)")
            return state
        except Exception as err:  # noqa: BLE001 - any unreadable checkpoint falls back to the previous one
            log(f"checkpoint {path.name} is unusable ({type(err).__name__}: {err}); falling back to the previous one")
    return None


def training_state(
    objects: dict[str, Any], dd: Dist, *, per_rank: tuple[str, ...] = ("loader", "budget"), **extra: Any
) -> dict:
    """A checkpoint's content: each object's ``state_dict()``, and every rank's own entries and RNG states.

    ``objects`` named in ``per_rank`` (data loaders: each rank reads its own shards; bad-sample budgets: each
    rank counts its own) and the global RNG states
    are gathered from every rank into ``state["ranks"]``, a list indexed by rank; the rest (model, optimizer,
    EMA: the same on every rank) are rank 0's. A collective: every rank calls it.

    Args:
        objects: name -> object with ``state_dict()`` (None values are left out).
        dd: this process.
        per_rank: the names whose state differs between ranks.
        **extra: plain values stored as they are (``samples_seen``, ``step``, ...).

    Returns:
        The state dict, with ``world_size`` and ``ranks``.
    """
    own = {k: o.state_dict() for k, o in objects.items() if o is not None and k in per_rank} | {"rng": rng_state()}
    shared = {k: o.state_dict() for k, o in objects.items() if o is not None and k not in per_rank}
    return shared | extra | {"world_size": dd.world, "ranks": gather_per_rank(own, dd)}


def restore_training_state(
    state: dict, objects: dict[str, Any], dd: Dist, *, per_rank: tuple[str, ...] = ("loader", "budget")
) -> None:
    """Loads what :func:`training_state` saved into ``objects``; each rank takes its own per-rank entries.

    Checkpoints from before per-rank entries (one ``loader`` and ``rng`` at the top level) load in one process.

    Raises:
        ResumeError: the checkpoint was written by another number of processes, or lacks an object's state.
    """
    ranks = state.get("ranks") or [{k: state[k] for k in (*per_rank, "rng") if k in state}]
    if len(ranks) != dd.world:
        raise ResumeError(
            f"the checkpoint at {state.get('samples_seen')} samples was written by {len(ranks)} "
            f"process(es), one data-loader state each; this run has {dd.world}: resume with "
            f"{len(ranks)} processes (or start afresh in another run.out_dir)"
        )
    mine = ranks[dd.rank]
    for name, obj in objects.items():
        if obj is None:
            continue
        source = mine if name in per_rank else state
        if name not in source:
            raise ResumeError(f"the checkpoint holds no {name!r} state (it has {sorted(source)})")
        obj.load_state_dict(source[name])
    set_rng_state(mine["rng"])
