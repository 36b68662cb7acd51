"""Before-training checks of a run's data sources: everything that can fail later, found in seconds now."""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from advtrain.data._bad import log
from advtrain.data._decode import decode_image
from advtrain.data._sources import ImageFolderSource, ShardSource, TensorSource, _caption, _label, _MapSource, _Skip
from advtrain.data._webdataset import ShardReadError, iter_shard_samples, local_path


def check_sources(
    sources: Mapping[str, object],
    *,
    world: int,
    num_workers: int,
    batch_size: int | None = None,
    train: Iterable[str] = ("train",),
) -> list[str]:
    """Checks every split's source before training; raises once, listing every problem found.

    Per split: local shard paths exist (an empty file is a warning: it would be skipped); ``http(s)`` shards
    have ``curl``; there are at least ``world x num_workers`` shards unless ``resampled`` (each reader needs one);
    one sample drawn from the first shard (or file, or tensor) has the image, label and caption the source
    needs, and its image decodes; the manifest lists the shards read; a map-style training split holds at least
    one global batch (``world x batch_size``).

    Args:
        sources: ``{split name: source}``, e.g. ``{"train": ShardSource(...), "val": ShardSource(...)}``.
        world: the number of processes.
        num_workers: DataLoader workers per process.
        batch_size: the per-rank batch size (checks the training splits' length); None: not checked.
        train: the names of the training splits in ``sources``.

    Returns:
        Warnings (also logged), e.g. an empty shard that will be skipped.

    Raises:
        ValueError: one message listing every problem, each naming its split, shard or path.
    """
    problems, warnings = [], []
    readers = world * max(num_workers, 1)
    train = set(train)
    for split, src in sources.items():
        p, w = _check_one(
            split,
            src,
            readers=readers,
            world=world,
            num_workers=num_workers,
            batch=batch_size if split in train else None,
        )
        problems += p
        warnings += w
    for msg in warnings:
        log.warning("%s", msg)
    if problems:
        raise ValueError(f"{len(problems)} data problem(s) found before training: " + "; ".join(problems))
    return warnings


def _check_one(split, src, *, readers, world, num_workers, batch) -> tuple[list[str], list[str]]:
    if isinstance(src, ShardSource):
        return _check_shards(split, src, readers=readers, world=world, num_workers=num_workers)
    if isinstance(src, _MapSource):
        problems = []
        n = len(src)
        if n == 0:
            what = f"{src.root} holds no image files" if isinstance(src, ImageFolderSource) else "no samples"
            return [f"{split!r}: {what}"], []
        if batch is not None and n < world * batch:
            problems.append(f"{split!r}: {n} samples make no global batch of {world} x {batch}")
        try:
            src._load(0, torch.Generator().manual_seed(0))
        except _Skip as skip:
            r = skip.record
            problems.append(f"{split!r}: its first sample {r.key!r} is unusable ({r.kind}): {r.message}")
        if isinstance(src, TensorSource) and src.labels is None and src.captions is None:
            problems.append(f"{split!r}: a TensorSource with neither labels nor captions")
        return problems, []
    return [f"{split!r}: not a data source: {type(src).__name__}"], []


def _check_shards(split, src: ShardSource, *, readers, world, num_workers) -> tuple[list[str], list[str]]:
    problems, warnings = [], []
    missing, empty = [], []
    for url in src.urls:
        path = local_path(url)
        if path is None:
            continue
        if not path.is_file():
            missing.append(url)
        elif path.stat().st_size == 0:
            empty.append(url)
    if missing:
        problems.append(f"{split!r}: {len(missing)} of {len(src.urls)} shards are missing: {missing[:5]}")
    if empty:
        warnings.append(f"{split!r}: {len(empty)} empty shard file(s), which will be skipped: {empty[:5]}")
    if any(u.startswith(("http://", "https://")) for u in src.urls) and shutil.which("curl") is None:
        problems.append(f"{split!r}: http(s) shards are read through curl, which is not installed")
    if not src.resampled and len(src.urls) < readers:
        problems.append(
            f"{split!r}: {len(src.urls)} shards cannot feed {readers} readers ({world} ranks x "
            f"{max(num_workers, 1)} workers): use fewer workers, more shards, or resampled shards"
        )
    if src.counts is not None:
        unlisted = [u for u in src.urls if u not in src.counts]
        if unlisted:
            warnings.append(f"{split!r}: {len(unlisted)} shards are not in the manifest: {unlisted[:5]}")
        root = local_path(str(src.spec)) if isinstance(src.spec, (str, Path)) else None
        root = root.parent if root is not None and root.is_file() else root
        if root is not None and root.is_dir() and src.split:
            extra = sorted(str(p) for p in root.glob(f"{src.split}-*.tar*") if str(p) not in src.counts)
            if extra:
                warnings.append(
                    f"{split!r}: {len(extra)} shard files in {root} are not in its manifest (not read): {extra[:5]}"
                )
    first = next((u for u in src.urls if u not in missing and u not in empty), None)
    if first is not None:
        problems += _check_first_sample(split, src, first)
    return problems, warnings


def _check_first_sample(split, src: ShardSource, url: str) -> list[str]:
    it = iter_shard_samples(url)
    try:
        raw = next(it)
    except StopIteration:
        return [f"{split!r}: the first shard {url} holds no sample"]
    except ShardReadError as err:
        return [f"{split!r}: {err}"]
    finally:
        it.close()
    key = raw["__key__"]
    members = sorted(k for k in raw if not k.startswith("__"))
    problems = []
    ext = next((k for k in src.image_keys if k in raw), None)
    if ext is None:
        problems.append(f"{split!r}: sample {key!r} of {url} has no image among {list(src.image_keys)} (has {members})")
    else:
        try:
            decode_image(raw[ext], decoder="pillow")
        except Exception as err:  # noqa: BLE001 - any decode failure is reported
            problems.append(f"{split!r}: the image of sample {key!r} of {url} does not decode: {err}")
    try:
        if src.labels:
            _label(raw.get(src.label_key), url=url, key=key, num_classes=src.num_classes)
        if src.captions:
            _caption(raw.get(src.caption_key), url=url, key=key)
    except _Skip as skip:
        want = src.label_key if skip.record.kind == "label" else src.caption_key
        problems.append(f"{split!r}: sample {key!r} of {url}: {skip.record.message} (needs .{want}; has {members})")
    return problems
