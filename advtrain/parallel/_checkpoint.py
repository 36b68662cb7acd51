"""Sharded checkpoints through torch.distributed.checkpoint (DCP): atomic directories, resharding resume, export."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

MANIFEST = "COMPLETE.json"
FORMAT = "advtrain-dcp-1"
EXTRA = "extra.pt"
_CHUNK = 1 << 22


def _dist() -> tuple[int, int, bool]:
    on = dist.is_available() and dist.is_initialized()
    return (dist.get_rank(), dist.get_world_size(), True) if on else (0, 1, False)


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it "assumes" a single process even when told so (``no_dist=True``); silence only that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _barrier(on: bool) -> None:
    if on:
        dist.barrier()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def _states(model: nn.Module, optimizer: torch.optim.Optimizer | None, ema: nn.Module | None) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is not None:
        fresh = not optimizer.state
        msd, osd = get_state_dict(model, optimizer)
        if fresh:  # DCP creates a fresh optimizer's state by a step at lr 0, which counts as one step
            _zero_step_counts(optimizer, osd)
        state = {"model": msd, "optim": osd}
    else:
        state = {"model": get_model_state_dict(model)}
    if ema is not None:
        state["ema"] = get_model_state_dict(ema)
    return state


def _zero_step_counts(optimizer: torch.optim.Optimizer, osd: dict) -> None:
    """Sets the ``step`` counts back to 0 (in the optimizer and in its state dict) after DCP's state creation.

    ``get_state_dict`` fills an optimizer that has no state yet by a step with zero gradients at learning rate
    0: the moments stay zero but Adam's ``step`` becomes 1, which changes the bias correction of every later
    update (measured: a step-0 checkpoint made an FSDP run's second loss differ from DDP's by 2e-4 relative).
    Zero moments with ``step`` 0 are exactly the state a lazily created Adam starts from.
    """
    for st in list(optimizer.state.values()) + list(osd.get("state", {}).values()):
        step = st.get("step") if isinstance(st, dict) else None
        if isinstance(step, torch.Tensor):
            step.zero_()
        elif isinstance(step, (int, float)):
            st["step"] = type(step)(0)


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    ema: nn.Module | None = None,
    extra: dict | None = None,
    rank_state: Any = None,
) -> Path:
    r"""Writes a sharded checkpoint directory atomically; every rank calls it (a collective).

    The model and optimizer states come from ``torch.distributed.checkpoint.state_dict.get_state_dict``
    (keys are the model's parameter names, FSDP/DDP/checkpoint-wrapper prefixes removed; optimizer state keyed
    by those names) and are written by ``torch.distributed.checkpoint.save``: every rank writes its own shards,
    replicated tensors once. All ranks write into ``.<name>.tmp`` next to ``path``; then each rank hashes a
    share of the files, rank 0 writes ``COMPLETE.json`` (world size, and the size and sha256 of every file)
    and renames the directory to ``path``. A crash at any point leaves either the previous ``path`` or the
    new one, never a half-written directory under that name (a stale ``.tmp`` is removed by the next save).

    Layout::

        path/
          .metadata            DCP metadata (tensor shapes, shard offsets, planner data)
          __<rank>_<i>.distcp  DCP shards, written by each rank
          extra.pt             ``extra`` (torch.save from rank 0: step, samples seen, config, ...)
          rank-00000.pt ...    each rank's ``rank_state`` (data loader position, RNG states), when given
          COMPLETE.json        the marker: format, world size, size and sha256 of every file above

    Works without a process group (one process) and with any world size; the directory must be on a file
    system every rank sees (as DCP requires for a multi-node save).

    Args:
        path: the checkpoint directory to create (e.g. ``run_dir / "checkpoints" / "ckpt-000001024000"``); an
            existing one of that name is replaced.
        model: the model (FSDP-sharded, DDP-wrapped or plain).
        optimizer: its optimizer (the state of an optimizer built on the sharded parameters is sharded too).
        ema: an EMA copy of the model, sharded like it (optional).
        extra: replicated, picklable state (plain Python values and tensors), taken from rank 0.
        rank_state: this rank's own state (e.g. its ``StatefulDataLoader.state_dict()``).

    Returns:
        ``Path(path)``.

    Side effects:
        Creates ``path`` (and its parent), replacing an older ``path``; collective calls (barriers, one
        ``all_gather_object``) on the default process group.

    Example:
        >>> import tempfile, torch
        >>> model = torch.nn.Linear(3, 2)
        >>> d = tempfile.mkdtemp()
        >>> p = save_checkpoint(f"{d}/ckpt-1", model=model, extra={"step": 1})
        >>> sorted(q.name for q in p.iterdir())[:3]
        ['.metadata', 'COMPLETE.json', '__0_0.distcp']
        >>> fresh = torch.nn.Linear(3, 2)
        >>> load_checkpoint(p, model=fresh).extra, torch.equal(fresh.weight, model.weight)
        ({'step': 1}, True)
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    rank, world, on = _dist()
    tmp = path.parent / f".{path.name}.tmp"
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier(on)
    with _quiet_single_process():
        dcp.save(_states(model, optimizer, ema), checkpoint_id=tmp, no_dist=not on)
    if rank_state is not None:
        torch.save(rank_state, tmp / _rank_file(rank))
    if rank == 0:
        torch.save(extra if extra is not None else {}, tmp / EXTRA)
    _barrier(on)
    names = [sorted(p.name for p in tmp.iterdir() if p.is_file())] if rank == 0 else [None]
    if on:  # one listing for all (a shared file system may show other nodes' files late)
        dist.broadcast_object_list(names, src=0)
    names = names[0]
    mine = {n: {"bytes": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)} for n in names[rank::world]}
    shares = [None] * world
    if on:
        dist.all_gather_object(shares, mine)
    else:
        shares = [mine]
    if rank == 0:
        files = {k: v for share in shares for k, v in share.items()}
        manifest = {"format": FORMAT, "world_size": world, "torch": torch.__version__, "files": files}
        with (tmp / MANIFEST).open("w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        old = path.parent / f".{path.name}.old"
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    _barrier(on)
    return path


def verify_checkpoint(path: str | os.PathLike, *, hashes: bool = False) -> dict:
    """Checks a checkpoint directory against its ``COMPLETE.json``; returns the manifest.

    Always: the marker exists and parses, every listed file exists with its recorded size, ``.metadata``
    matches its sha256, and no ``.distcp`` file is missing from the list. With ``hashes=True`` every file's
    sha256 is checked too (reads the whole checkpoint).

    Args:
        path: a checkpoint directory written by :func:`save_checkpoint`.
        hashes: verify the sha256 of every file, not only of the metadata.

    Returns:
        The manifest (``format``, ``world_size``, ``torch``, ``files``).

    Raises:
        ValueError: anything that does not match, with the file named.

    Example:
        >>> verify_checkpoint("/nonexistent")
        Traceback (most recent call last):
        ...
        ValueError: /nonexistent is not a complete checkpoint: COMPLETE.json is missing
    """
    path = Path(path)
    marker = path / MANIFEST
    if not marker.is_file():
        raise ValueError(f"{path} is not a complete checkpoint: {MANIFEST} is missing")
    try:
        manifest = json.loads(marker.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{marker} is unreadable ({err})") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{marker}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if ".metadata" not in files:
        raise ValueError(f"{path}: the manifest lists no .metadata")
    for name, rec in files.items():
        f = path / name
        if not f.is_file():
            raise ValueError(f"{path}: {name} is missing")
        if f.stat().st_size != rec["bytes"]:
            raise ValueError(f"{path}: {name} has {f.stat().st_size} bytes, the manifest says {rec['bytes']}")
        if (hashes or name == ".metadata") and _sha256(f) != rec["sha256"]:
            raise ValueError(f"{path}: {name} does not match its sha256 (corrupt)")
    unlisted = sorted(p.name for p in path.glob("*.distcp") if p.name not in files)
    if unlisted:
        raise ValueError(f"{path}: shards not in the manifest: {unlisted}")
    return manifest


class Resumed(NamedTuple):
    """What :func:`load_checkpoint` returns besides the states it loads in place."""

    path: Path
    extra: dict
    """The ``extra`` dict given to :func:`save_checkpoint`."""
    rank_state: Any
    """This rank's ``rank_state``; ``None`` when the checkpoint was saved by another number of ranks (the
    caller re-derives per-rank state, e.g. a data loader position, from ``extra``) or none was saved."""
    saved_world: int
    """The number of ranks that wrote the checkpoint."""


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    ema: nn.Module | None = None,
) -> Resumed:
    r"""Loads a :func:`save_checkpoint` directory into ``model`` (and ``optimizer``, ``ema``) in place.

    A collective: every rank calls it. Reads through ``torch.distributed.checkpoint.load`` into the state
    dicts of ``get_state_dict`` and applies them with ``set_state_dict``, so the checkpoint's sharding does not
    matter: a checkpoint written by ``W`` ranks loads on ``W'`` ranks, sharded or not (one process, no process
    group, a plain model), each rank reading only the slices it owns. The optimizer must be built on the
    (sharded) parameters already; its state, step counts and param-group hyperparameters are restored.

    Args:
        path: the checkpoint directory (checked with :func:`verify_checkpoint` first, sizes and metadata only).
        model: the model to load into, built like the saved one (FSDP-sharded, DDP-wrapped or plain).
        optimizer: the optimizer to restore (the checkpoint must hold one).
        ema: the EMA model to restore (the checkpoint must hold one).

    Returns:
        :class:`Resumed` with ``extra``, this rank's ``rank_state`` and the saved world size.

    Raises:
        ValueError: an incomplete or corrupt checkpoint; a requested state it does not hold.
        RuntimeError: (from DCP) tensors whose names or shapes do not match the model.

    Side effects:
        Overwrites the parameters and buffers of ``model`` (and ``ema``) and the state of ``optimizer``.

    Example:
        See :func:`save_checkpoint`.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    path = Path(path)
    rank, world, on = _dist()
    manifest = verify_checkpoint(path)
    state = _states(model, optimizer, ema)
    held = {k.split(".", 1)[0] for k in _metadata(path).state_dict_metadata}
    missing = sorted(set(state) - held)
    if missing:
        raise ValueError(f"{path} holds {sorted(held)}; it has no {missing} to load")
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=path, no_dist=not on)
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        set_model_state_dict(model, state["model"])
    if ema is not None:
        set_model_state_dict(ema, state["ema"])
    extra = torch.load(path / EXTRA, map_location="cpu", weights_only=True) if (path / EXTRA).exists() else {}
    saved_world = int(manifest["world_size"])
    own = path / _rank_file(rank)
    rank_state = None
    if saved_world == world and own.exists():
        rank_state = torch.load(own, map_location="cpu", weights_only=True)
    return Resumed(path, extra, rank_state, saved_world)


def _metadata(path: Path):
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(path)).read_metadata()


def latest_checkpoint(
    root: str | os.PathLike, *, pattern: str = "ckpt-*", log: Callable[[str], None] | None = None
) -> Path | None:
    """The newest complete checkpoint directory under ``root`` (by name), or ``None``.

    Directories are tried newest first (names sort by step when the step is zero-padded, as
    ``ckpt-000001024000``); one that fails :func:`verify_checkpoint` (a missing marker, a truncated shard, a
    corrupt ``.metadata``) is reported through ``log`` and skipped, so a run falls back to the previous one.
    Under a process group this is a collective: rank 0 decides and every rank gets its answer, so all ranks
    resume from the same directory.

    Args:
        root: the folder holding the checkpoint directories.
        pattern: glob of their names.
        log: called with one line per skipped directory.

    Returns:
        The path, or ``None`` when there is none.

    Example:
        >>> latest_checkpoint("/nonexistent") is None
        True
    """
    rank, _, on = _dist()
    found = [_newest_complete(Path(root), pattern, log) if rank == 0 else None]
    if on:
        dist.broadcast_object_list(found, src=0)
    return None if found[0] is None else Path(found[0])


def _newest_complete(root: Path, pattern: str, log) -> str | None:
    if not root.is_dir():
        return None
    for cand in sorted((p for p in root.glob(pattern) if p.is_dir()), reverse=True):
        try:
            verify_checkpoint(cand)
            return str(cand)
        except ValueError as err:
            if log is not None:
                log(f"skipping checkpoint {cand.name}: {err}")
    return None


def prune_checkpoints(root: str | os.PathLike, *, keep: int, pattern: str = "ckpt-*") -> list[Path]:
    """Deletes all but the newest ``keep`` complete checkpoints under ``root`` (rank 0 only); returns them.

    Incomplete directories newer than the newest complete one are left alone (a save may be under way).

    Args:
        root: the folder holding the checkpoint directories.
        keep: how many complete checkpoints to keep, ``>= 1``.
        pattern: glob of their names.

    Raises:
        ValueError: ``keep < 1``.

    Example:
        >>> prune_checkpoints("/nonexistent", keep=2)
        []
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an int >= 1; got {keep!r}")
    root = Path(root)
    if _dist()[0] != 0 or not root.is_dir():
        return []
    complete = [p for p in sorted(root.glob(pattern)) if p.is_dir() and (p / MANIFEST).is_file()]
    gone = complete[:-keep]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def consolidate(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    key: str = "model",
    strip_prefix: str = "inner.",
    drop: tuple[str, ...] = ("logit_scale",),
) -> dict[str, torch.Tensor]:
    r"""Converts one state of a DCP checkpoint into a single-file plain state dict that timm loads.

    Reads only the ``key`` state (``"model"`` or ``"ema"``; the optimizer is never loaded) from the shards, in
    this process alone (no process group needed, none used), as full tensors on the CPU; removes
    ``strip_prefix`` from the names (the recipes' ``Normalized`` wrapper keeps the timm model at ``.inner``)
    and drops the wrapper's own tensors ``drop``. The result is what
    ``timm.create_model(name, **kwargs).load_state_dict(sd, strict=True)`` and
    ``python -m advtrain.eval --checkpoint`` load. ``out`` ending in ``.safetensors`` is written with
    safetensors, anything else with ``torch.save``.

    Args:
        path: a checkpoint directory of :func:`save_checkpoint` (verified, metadata only).
        out: the file to write (its parent is created).
        key: which state: ``"model"`` or ``"ema"``.
        strip_prefix: removed from the start of every name that has it (``""``: keep names).
        drop: names (after stripping) to leave out.

    Returns:
        The state dict that was written.

    Raises:
        ValueError: an incomplete checkpoint, or one without ``key``.

    Example:
        >>> import tempfile, timm, torch
        >>> class Normalized(torch.nn.Module):
        ...     def __init__(self, inner):
        ...         super().__init__()
        ...         self.inner = inner
        >>> make = lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1,
        ...                                  embed_dim=32, num_heads=2, num_classes=10)
        >>> d = tempfile.mkdtemp()
        >>> p = save_checkpoint(f"{d}/ckpt-1", model=Normalized(make()))
        >>> sd = consolidate(p, f"{d}/model.pt")
        >>> make().load_state_dict(torch.load(f"{d}/model.pt", weights_only=True), strict=True)
        <All keys matched successfully>
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path, out = Path(path), Path(out)
    verify_checkpoint(path)
    md = _metadata(path)
    target: dict[str, torch.Tensor] = {}
    for flat, meta in md.state_dict_metadata.items():
        route = md.planner_data.get(flat, (flat,)) if md.planner_data else (flat,)
        if route[0] != key:
            continue
        if not isinstance(meta, TensorStorageMetadata):
            continue
        name = ".".join(str(r) for r in route[1:])
        target[name] = torch.empty(meta.size, dtype=meta.properties.dtype)
    if not target:
        held = sorted({(md.planner_data or {}).get(k, (k,))[0] for k in md.state_dict_metadata})
        raise ValueError(f"{path} holds no {key!r} state (it holds {held})")
    with _quiet_single_process():
        dcp.load({key: target}, checkpoint_id=path, no_dist=True)
    sd = {}
    for name, t in target.items():
        short = name[len(strip_prefix) :] if strip_prefix and name.startswith(strip_prefix) else name
        if short not in drop:
            sd[short] = t
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(out))
    else:
        torch.save(sd, out)
    return sd
