"""Glue for the recipes: the train/val sources of a run from a few config fields, digits arrays, epoch sizes.

Both recipes read the same ``data`` fields (``kind``, ``path``, splits, ``in_memory``, ``resampled``), so the
mapping from those fields to :class:`TensorSource` / :class:`ImageFolderSource` / :class:`ShardSource` lives here
once instead of in each ``train.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from advtrain.data._shards import load_image_set
from advtrain.data._sources import ImageFolderSource, ShardSource, TensorSource, Transform

KINDS = ("digits", "folder", "wds")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The ``data`` config fields :func:`sources_from_config` reads; the recipes' ``Data`` sections extend it."""

    kind: str = "folder"  # digits: scikit-learn's bundled digits; folder: ImageNet-style class folders; wds: shards
    path: str | None = None  # folder: holds train/ and val/; wds: a folder with manifest.json (or <split>-*.tar*),
    #                          or a brace pattern / pipe: / http(s) URL list of the training shards
    val_path: str | None = None  # wds with a pattern/URL path: the validation shards
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = 256  # images per step, global (split over ranks)
    num_workers: int = 4  # DataLoader workers per rank
    val_samples: int | None = None  # evaluate on at most this many validation images
    in_memory: bool = False  # wds: decode the whole split into memory first (small sets)
    crop_pct: float = 0.875  # evaluation: shorter side to size / crop_pct, center crop (timm)
    resampled: bool = False  # wds: draw training shards with replacement
    bad_sample_budget: float = 0.001  # stop the run once this fraction of the samples read is bad

    def __post_init__(self):
        if not 0 < self.crop_pct <= 1 or not 0 <= self.bad_sample_budget <= 1:
            raise ValueError(
                f"need 0 < data.crop_pct <= 1 and 0 <= data.bad_sample_budget <= 1; got "
                f"{self.crop_pct}, {self.bad_sample_budget}"
            )


@dataclass(frozen=True, kw_only=True)
class AugmentConfig:
    """The ``augment`` fields of the standard training crop (timm's defaults); the recipes' sections extend it."""

    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area fractions of the original image
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratios w / h
    interpolation: str = "bicubic"  # crop / evaluation resize filter: bilinear, bicubic, lanczos, nearest
    hflip: bool = True  # horizontal flip with probability 0.5
    random_erasing: float = 0.0  # probability of erasing one box with uniform [0, 1] noise (random_erase); 0: off

    def __post_init__(self):
        if not 0 <= self.random_erasing <= 1:
            raise ValueError(f"augment.random_erasing must be a probability in [0, 1]; got {self.random_erasing}")


def digits_arrays(seed: int = 0, *, size: int = 32) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's bundled 8x8 digits as ``(N, 3, size, size)`` uint8, split 75/25 by a seeded permutation.

    Returns:
        ``(train_images, train_labels, val_images, val_labels)``; labels int64 in [0, 10).
    """
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).clamp(0, 1)
    x = (x * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.75 * len(y))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def _is_folder(path: str | None) -> bool:
    return (
        path is not None
        and "://" not in path
        and not path.startswith("pipe:")
        and "{" not in path
        and Path(path).is_dir()
    )


def split_sources(
    kind: str,
    *,
    path: str | None,
    train_split: str = "train",
    val_split: str = "val",
    val_path: str | None = None,
    train_transform: Transform,
    val_transform: Transform,
    seed: int = 0,
    in_memory: bool = False,
    resampled: bool = False,
    labels: bool = True,
    captions: bool = False,
    num_classes: int | None = None,
    shuffle_buffer: int | None = 1000,
) -> tuple:
    """The (train, val) sources a recipe's ``data`` section names.

    Args:
        kind: ``"digits"`` (scikit-learn digits, 32 px), ``"folder"`` (``path/<split>/<class>/<image>``) or
            ``"wds"`` (WebDataset shards).
        path: ``folder``: the root holding the split folders. ``wds``: a folder with manifest.json (or
            ``<split>-*.tar*``) read with the split names, or a brace pattern / ``pipe:`` / http(s) URL list for the
            training shards (then ``val_path`` names the validation shards).
        train_split, val_split: split names under a folder.
        val_path: ``wds`` with a non-folder ``path``: the validation shards' specification.
        train_transform, val_transform: ``transform(image, generator)`` (:func:`advtrain.data.train_transform`,
            :func:`advtrain.data.val_transform`).
        seed: digits' split permutation.
        in_memory: ``wds`` from a folder: decode both splits into memory (:func:`load_image_set`), small sets.
        resampled: training shards drawn with replacement (:class:`ShardSource`).
        labels, captions: the training split reads ``cls`` / ``txt`` (image-text shards without ``cls``:
            ``labels=False, captions=True``; digits get "a photo of the digit k." captions); validation always reads
            the labels only (a zero-shot evaluation classifies).
        num_classes: labels outside ``[0, num_classes)`` are bad samples.
        shuffle_buffer: the training shards' in-shard shuffle buffer (samples).

    Returns:
        ``(train_source, val_source)``; the validation stream is one in-order epoch.

    Raises:
        ValueError: an unknown kind, or ``wds`` from a pattern without ``val_path``.
        FileNotFoundError: a missing folder.
    """
    if kind == "digits":
        xt, yt, xv, yv = digits_arrays(seed)
        caps = [f"a photo of the digit {int(c)}." for c in yt] if captions else None
        return (
            TensorSource(xt, yt, caps, transform=train_transform, name="digits-train"),
            TensorSource(xv, yv, transform=val_transform, name="digits-val"),
        )
    if kind not in KINDS:
        raise ValueError(f"data.kind must be one of {KINDS}; got {kind!r}")
    if not path:
        raise ValueError(f"data.kind={kind!r} needs data.path")
    local = "://" not in path and not path.startswith("pipe:") and "{" not in path
    if local and not Path(path).exists():
        raise FileNotFoundError(f"data.path {path!r} does not exist (data.kind={kind!r})")
    if kind == "folder":
        return (
            ImageFolderSource(Path(path) / train_split, transform=train_transform),
            ImageFolderSource(Path(path) / val_split, transform=val_transform),
        )
    folder = _is_folder(path)
    if in_memory:
        if not folder:
            raise ValueError(f"data.in_memory needs data.path to be a shard folder; got {path!r}")
        tr, va = load_image_set(path, train_split), load_image_set(path, val_split)
        uncaptioned = sum(not c for c in tr.captions) if captions else 0
        if uncaptioned:
            raise ValueError(
                f"captions requested but {uncaptioned} of {len(tr.captions)} samples of {path!r} split "
                f"{train_split!r} have no .txt caption"
            )
        return (
            TensorSource(
                tr.images,
                tr.labels if labels else None,
                tr.captions if captions else None,
                transform=train_transform,
                name=train_split,
            ),
            TensorSource(va.images, va.labels, transform=val_transform, name=val_split),
        )
    if not folder and not val_path:
        raise ValueError(
            f"data.path {path!r} is a shard pattern or URL list: name the validation shards in data.val_path"
        )
    tr_spec, va_spec = (path, path) if folder else (path, val_path)
    tr_split, va_split = (train_split, val_split) if folder else (None, None)
    if va_spec != path:
        va_split = val_split if _is_folder(va_spec) else None
    common = {"num_classes": num_classes}
    train = ShardSource(
        tr_spec,
        split=tr_split,
        transform=train_transform,
        labels=labels,
        captions=captions,
        resampled=resampled,
        shuffle_buffer=shuffle_buffer,
        **common,
    )
    val = ShardSource(
        va_spec, split=va_split, transform=val_transform, epochs=1, shuffle_shards=False, shuffle_buffer=0, **common
    )
    return train, val


def epoch_size(source, override: int | None = None) -> int | None:
    """Samples per epoch: ``override``, else the map-style source's length, else the shards' manifest counts."""
    if override:
        return int(override)
    if isinstance(source, ShardSource):
        return sum(source.counts.values()) if source.counts else None
    return len(source)


def sources_from_config(
    data,
    augment,
    *,
    size: int,
    seed: int,
    randaugment: str | None = None,
    labels: bool = True,
    captions: bool = False,
    num_classes: int | None = None,
) -> tuple:
    """:func:`split_sources` with the standard transforms, from a recipe's ``data`` and ``augment`` sections.

    Reads ``data.kind, path, val_path, train_split, val_split, in_memory, resampled, crop_pct`` and
    ``augment.crop_scale, crop_ratio, hflip, interpolation, random_erasing`` (the recipes' config fields, timm's
    defaults).
    Training: :func:`advtrain.data.train_transform` (RandomResizedCrop of the original image to ``size``);
    validation: :func:`advtrain.data.val_transform` (``crop_pct``).
    """
    from advtrain.data._transforms import train_transform, val_transform

    tt = train_transform(
        size=size,
        scale=tuple(augment.crop_scale),
        ratio=tuple(augment.crop_ratio),
        hflip=0.5 if augment.hflip else 0.0,
        randaugment=randaugment,
        interpolation=augment.interpolation,
        erase=getattr(augment, "random_erasing", 0.0),
    )
    vt = val_transform(size=size, crop_pct=data.crop_pct, interpolation=augment.interpolation)
    return split_sources(
        data.kind,
        path=data.path,
        train_split=data.train_split,
        val_split=data.val_split,
        val_path=data.val_path,
        train_transform=tt,
        val_transform=vt,
        seed=seed,
        in_memory=data.in_memory,
        resampled=data.resampled,
        labels=labels,
        captions=captions,
        num_classes=num_classes,
    )


def check_run_sources(
    train,
    val,
    *,
    world: int,
    num_workers: int,
    batch_size: int,
    epoch: int | None = None,
    val_samples: int | None = None,
    need_epoch: bool = False,
    need_val_samples: bool = False,
) -> None:
    """:func:`advtrain.data.check_sources` on a run's two splits, plus what a recipe's schedule needs of them.

    Args:
        train, val: the sources (:func:`split_sources`).
        world, num_workers: the run's ranks and workers per rank (every reader needs a shard).
        batch_size: the global batch (a map-style training split must hold one).
        epoch: ``data.train_size`` (an explicit epoch size), if any.
        val_samples: ``data.val_samples``.
        need_val_samples: a streamed validation split needs ``val_samples`` (the evaluation indexes a fixed subset).
        need_epoch: the schedule counts epochs: streamed shards need a manifest count or ``epoch``.

    Raises:
        ValueError: every problem :func:`check_sources` finds, or a missing size.
    """
    from advtrain.data._checks import check_sources

    check_sources(
        {"train": train, "val": val}, world=world, num_workers=num_workers, batch_size=max(1, batch_size // world)
    )
    if need_epoch and epoch_size(train, epoch) is None:
        raise ValueError("streamed shards without a manifest count: set data.train_size (images per epoch)")
    if need_val_samples and isinstance(val, ShardSource) and val_samples is None:
        raise ValueError("streaming validation data needs data.val_samples")


def class_names(data, *, num_classes: int) -> list[str]:
    """Class names of a ``data`` section's split: digits 0-9, a shard manifest's ``class_names`` (else the indices
    as strings), or the class folder names (sorted, as their indices)."""
    import json

    if data.kind == "digits":
        return [str(i) for i in range(10)]
    if data.kind == "wds":
        manifest = Path(data.path) / "manifest.json" if _is_folder(data.path) else None
        names = json.loads(manifest.read_text()).get("class_names") if manifest and manifest.exists() else None
        return list(names) if names else [str(i) for i in range(num_classes)]
    return sorted(p.name for p in (Path(data.path) / data.train_split).iterdir() if p.is_dir())


def eval_subset(source, k: int | None, *, seed: int) -> tuple[list[Tensor], list[int]]:
    """A fixed evaluation subset as (uint8 images, int labels): ``k`` seeded indices of a map-style source (all
    of it when ``k`` is None or covers it), or the first ``k`` samples of a stream (its order is fixed by ``seed``).

    Raises:
        ValueError: a stream with ``k`` None (its size is unknown).
    """
    if isinstance(source, ShardSource):
        if k is None:
            raise ValueError("a fixed subset of a streamed split needs a sample count")
        items = []
        for s in source.bind(seed=seed):
            items.append(s)
            if len(items) >= k:
                break
    else:
        n = len(source)
        idx = (
            range(n)
            if k is None or k >= n
            else sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())
        )
        items = [source[i] for i in idx]
    return [s.image for s in items], [int(s.label) for s in items]
