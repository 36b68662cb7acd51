"""Glue for the recipes: the train/val sources of a run from a few config fields, digits arrays, epoch sizes.

Both recipes read the same ``data`` fields (``kind``, ``path``, splits, ``in_memory``, ``resampled``), so the
mapping from those fields to :class:`TensorSource` / :class:`ImageFolderSource` / :class:`ShardSource` lives here
once instead of in each ``train.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from advtrain.data._shards import load_image_set
from advtrain.data._sources import ImageFolderSource, ShardSource, TensorSource, Transform

KINDS = ("digits", "folder", "wds")


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
    return path is not None and "://" not in path and not path.startswith("pipe:") and "{" not in path \
        and Path(path).is_dir()


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
        return (TensorSource(xt, yt, caps, transform=train_transform, name="digits-train"),
                TensorSource(xv, yv, transform=val_transform, name="digits-val"))
    if kind not in KINDS:
        raise ValueError(f"data.kind must be one of {KINDS}; got {kind!r}")
    if not path:
        raise ValueError(f"data.kind={kind!r} needs data.path")
    local = "://" not in path and not path.startswith("pipe:") and "{" not in path
    if local and not Path(path).exists():
        raise FileNotFoundError(f"data.path {path!r} does not exist (data.kind={kind!r})")
    if kind == "folder":
        return (ImageFolderSource(Path(path) / train_split, transform=train_transform),
                ImageFolderSource(Path(path) / val_split, transform=val_transform))
    folder = _is_folder(path)
    if in_memory:
        if not folder:
            raise ValueError(f"data.in_memory needs data.path to be a shard folder; got {path!r}")
        tr, va = load_image_set(path, train_split), load_image_set(path, val_split)
        return (TensorSource(tr.images, tr.labels, transform=train_transform, name=train_split),
                TensorSource(va.images, va.labels, transform=val_transform, name=val_split))
    if not folder and not val_path:
        raise ValueError(f"data.path {path!r} is a shard pattern or URL list: name the validation shards in "
                         f"data.val_path")
    tr_spec, va_spec = (path, path) if folder else (path, val_path)
    tr_split, va_split = (train_split, val_split) if folder else (None, None)
    if va_spec != path:
        va_split = val_split if _is_folder(va_spec) else None
    common = {"num_classes": num_classes}
    train = ShardSource(tr_spec, split=tr_split, transform=train_transform, labels=labels, captions=captions,
                        resampled=resampled, shuffle_buffer=shuffle_buffer, **common)
    val = ShardSource(va_spec, split=va_split, transform=val_transform, epochs=1, shuffle_shards=False, shuffle_buffer=0, **common)
    return train, val


def epoch_size(source, override: int | None = None) -> int | None:
    """Samples per epoch: ``override``, else the map-style source's length, else the shards' manifest counts."""
    if override:
        return int(override)
    if isinstance(source, ShardSource):
        return sum(source.counts.values()) if source.counts else None
    return len(source)


def sources_from_config(data, augment, *, size: int, seed: int, randaugment: str | None = None,
                        labels: bool = True, captions: bool = False, num_classes: int | None = None) -> tuple:
    """:func:`split_sources` with the standard transforms, from a recipe's ``data`` and ``augment`` sections.

    Reads ``data.kind, path, val_path, train_split, val_split, in_memory, resampled, crop_pct`` and
    ``augment.crop_scale, crop_ratio, hflip, interpolation`` (the recipes' config fields, timm's defaults).
    Training: :func:`advtrain.data.train_transform` (RandomResizedCrop of the original image to ``size``);
    validation: :func:`advtrain.data.val_transform` (``crop_pct``).
    """
    from advtrain.data._transforms import train_transform, val_transform

    tt = train_transform(size=size, scale=tuple(augment.crop_scale), ratio=tuple(augment.crop_ratio),
                         hflip=0.5 if augment.hflip else 0.0, randaugment=randaugment,
                         interpolation=augment.interpolation)
    vt = val_transform(size=size, crop_pct=data.crop_pct, interpolation=augment.interpolation)
    return split_sources(data.kind, path=data.path, train_split=data.train_split, val_split=data.val_split,
                         val_path=data.val_path, train_transform=tt, val_transform=vt, seed=seed,
                         in_memory=data.in_memory, resampled=data.resampled, labels=labels, captions=captions,
                         num_classes=num_classes)
