"""Sources of (image, label, caption) samples: in-memory tensors, class folders, WebDataset shards.

Every source turns one stored sample into a :class:`Sample`: a uint8 ``(3, H, W)`` image from its transform, the
int label (or None), the caption (or None), a key naming the sample, and the bad-sample records of whatever was
skipped since the previous sample. The transform is called as ``transform(image, generator)`` with a generator
seeded by ``(seed, epoch, sample id)``: augmentation does not depend on the worker layout, and a resumed run
replays it exactly.

Two kinds:

- map-style (:class:`TensorSource`, :class:`ImageFolderSource`): ``source[(epoch, index)]``, fed by
  :class:`advtrain.data.ShardedSampler`. A bad sample is replaced by the next readable index (deterministically,
  recording the skip), so every rank's batches keep their size and DDP stays in lockstep.
- streams (:class:`ShardSource`): iterable, shards dealt to ranks x workers, samples shuffled within a shard
  through a buffer; a bad sample is skipped. Resumable mid-shard through ``state_dict`` (torchdata's
  StatefulDataLoader calls it in each worker).
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from advtrain.data._bad import BadSample, log
from advtrain.data._webdataset import ShardReadError, expand_urls, iter_shard_samples, manifest_counts

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")

Transform = Callable[..., Tensor]  # transform(image, generator) -> uint8 (3, H, W)


class Sample(NamedTuple):
    """One decoded sample as a source yields it (the collate function stacks these into a Batch)."""

    image: Tensor  # (3, H, W) uint8
    label: int | None
    caption: str | None
    key: str
    bad: tuple[BadSample, ...]  # records of what was skipped since the previous sample


class _Skip(Exception):
    """A sample the reader must skip; carries its record."""

    def __init__(self, record: BadSample):
        super().__init__(record.message)
        self.record = record


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from printable parts, the same in every process (Python's ``hash`` of a str is salted).

    Example:
        >>> stable_seed(0, 1, "train-0000.tar") == stable_seed(0, 1, "train-0000.tar")
        True
    """
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def sample_generator(*parts: Any) -> torch.Generator:
    """A fresh CPU generator seeded by :func:`stable_seed` of ``parts``: one per sample."""
    return torch.Generator().manual_seed(stable_seed(*parts))


def _apply(transform: Transform | None, image, generator: torch.Generator) -> Tensor:
    if transform is None:
        from advtrain.data._decode import decode_image, pil_to_uint8, to_pil

        img = decode_image(bytes(image)) if isinstance(image, (bytes, bytearray, memoryview)) else to_pil(image)
        return pil_to_uint8(img)
    return transform(image, generator)


def _label(raw: bytes | int | None, *, url: str, key: str, num_classes: int | None) -> int:
    if raw is None:
        raise _Skip(BadSample("label", url, key, "no label"))
    try:
        y = int(raw.decode("ascii").strip() if isinstance(raw, (bytes, bytearray)) else raw)
    except (ValueError, UnicodeDecodeError):
        raise _Skip(BadSample("label", url, key, f"malformed label {bytes(raw)[:32]!r}")) from None
    if y < 0 or (num_classes is not None and y >= num_classes):
        raise _Skip(BadSample("label", url, key, f"label {y} outside [0, {num_classes})"))
    return y


def _caption(raw: bytes | str | None, *, url: str, key: str) -> str:
    if raw is None:
        raise _Skip(BadSample("caption", url, key, "no caption"))
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError as err:
        raise _Skip(BadSample("caption", url, key, f"caption is not UTF-8: {err}")) from None


def _image(transform, data, generator, *, url: str, key: str) -> Tensor:
    try:
        return _apply(transform, data, generator)
    except Exception as err:  # noqa: BLE001 - corrupt files raise OSError, ValueError, SyntaxError, IndexError...
        # a bug in a transform lands here too: the budget then stops the run, and the log names the error type
        detail = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err))  # no addresses: records compare
        raise _Skip(BadSample("decode", url, key, f"{type(err).__name__}: {detail}")) from None


# ------------------------------------------------------------------------------------------------ map-style


class _MapSource(Dataset):
    """A map-style source: ``load(i)`` gives one stored sample; bad ones are replaced by the next index."""

    max_replacements = 1000  # consecutive unreadable samples before giving up

    seed: int = 0
    transform: Transform | None

    def __len__(self) -> int:
        raise NotImplementedError

    def _load(self, i: int, generator: torch.Generator) -> Sample:
        raise NotImplementedError

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        n, records = len(self), []
        for j in range(i, i + min(self.max_replacements, n)):
            try:
                s = self._load(j % n, sample_generator(self.seed, epoch, j % n))
            except _Skip as skip:
                records.append(skip.record)
                continue
            return s._replace(bad=tuple(records))
        raise RuntimeError(f"{len(records)} consecutive unreadable samples from index {i}: {records[:3]} ...")

    def bind(self, *, seed: int, rank: int = 0, world: int = 1) -> _MapSource:
        """A copy seeded for a run (the sampler, not the source, deals indices to ranks)."""
        out = copy.copy(self)
        out.seed = seed
        return out


class TensorSource(_MapSource):
    """In-memory uint8 images ``(N, C, H, W)`` (C = 1 or 3) with labels and/or captions, as a map-style source.

    For small sets (scikit-learn digits, :func:`advtrain.data.load_image_set` output): each image goes through
    the same transform as a decoded file (as a PIL image), so the recipes have one path.

    Args:
        images: ``(N, C, H, W)`` uint8.
        labels: ``(N,)`` int64, or None.
        captions: N strings, or None.
        transform: ``transform(image, generator) -> (3, H, W) uint8``; None: the image as RGB, unchanged.
        name: names the source in keys and bad-sample records.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor | None = None,
        captions: Sequence[str] | None = None,
        *,
        transform: Transform | None = None,
        name: str = "tensors",
    ):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"images must be uint8 (N, C, H, W) with C in (1, 3); got {images.dtype} {tuple(images.shape)}"
            )
        n = images.shape[0]
        if labels is not None and tuple(labels.shape) != (n,):
            raise ValueError(f"labels must have shape ({n},); got {tuple(labels.shape)}")
        if captions is not None and len(captions) != n:
            raise ValueError(f"{n} images but {len(captions)} captions")
        self.images, self.labels, self.captions = images, labels, None if captions is None else list(captions)
        self.transform, self.name = transform, name

    def __len__(self) -> int:
        return self.images.shape[0]

    def _load(self, i: int, generator: torch.Generator) -> Sample:
        x = self.images[i]
        img = x if self.transform is not None else (x.expand(3, -1, -1) if x.shape[0] == 1 else x)
        out = _apply(self.transform, img, generator) if self.transform is not None else img.contiguous()
        y = None if self.labels is None else int(self.labels[i])
        cap = None if self.captions is None else self.captions[i]
        return Sample(out, y, cap, f"{self.name}/{i}", ())


class ImageFolderSource(_MapSource):
    """ImageNet-style class folders (``root/<class>/<image>``), decoded from the file bytes (so JPEGs draft).

    Classes and files are listed with torchvision's ``find_classes`` / ``make_dataset`` (sorted, like
    ``ImageFolder``). A file that cannot be read or decoded is replaced by the next one and recorded.

    With ``classes`` (e.g. the 1000 ImageNet wnids of a model's outputs), labels index that list instead of the
    folder's own sorted classes: an evaluation set holding a subset of the classes (ImageNet-R's 200 wnids, one
    corruption's folder of ImageNet-C) gets the labels the model was trained with. ``folder_classes`` lists the
    class folders found either way.

    Args:
        root: the split's folder (``.../train``).
        transform: ``transform(bytes, generator) -> (3, H, W) uint8``.
        extensions: image file extensions to list (lower case, with the dot).
        classes: the label order (class folder names); None: the folder's own sorted class folders.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: with ``classes``, a class folder that is not among them (the message names a few).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        transform: Transform | None = None,
        extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".tif", ".tiff"),
        classes: Sequence[str] | None = None,
    ):
        from torchvision.datasets.folder import find_classes, make_dataset

        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root} is not a folder: expected class folders under it")
        self.folder_classes, self.class_to_idx = find_classes(str(self.root))
        self.classes = self.folder_classes
        if classes is not None:
            order = {c: i for i, c in enumerate(classes)}
            unknown = [c for c in self.folder_classes if c not in order]
            if unknown:
                raise ValueError(
                    f"{self.root}: {len(unknown)} class folder(s) are not among the {len(order)} classes given "
                    f"(e.g. {unknown[:3]})"
                )
            self.classes, self.class_to_idx = list(classes), {c: order[c] for c in self.folder_classes}
        self.samples = make_dataset(str(self.root), self.class_to_idx, extensions=extensions)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, i: int, generator: torch.Generator) -> Sample:
        path, y = self.samples[i]
        key = os.path.relpath(path, self.root)
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            raise _Skip(BadSample("read", str(self.root), key, f"{type(err).__name__}: {err}")) from None
        return Sample(_image(self.transform, data, generator, url=str(self.root), key=key), y, None, key, ())


# ------------------------------------------------------------------------------------------------ streams


class ShardSource(IterableDataset):
    """WebDataset shards as an endless (or ``epochs``-long) stream, resumable mid-shard, skipping bad samples.

    Each epoch the shard list is permuted (seed, epoch) and dealt round-robin to the ``world x num_workers``
    readers (reader ``rank * num_workers + worker``): no shard is read twice in an epoch and every shard is read.
    With ``resampled=True`` every reader instead draws ``shards_per_epoch`` shards with replacement from the
    whole list per epoch (web-scale training: no epoch boundary to synchronize; count schedules in samples seen).
    Readers run at their own pace: with shards of unequal size ranks may be in different epochs, which is fine
    for schedules in samples seen.

    Within a shard, samples pass through a seeded shuffle buffer of ``shuffle_buffer`` raw (encoded) samples;
    ``None`` buffers the whole shard (a full permutation), 0 keeps tar order. Each sample's augmentation is seeded
    by (seed, epoch, shard, key). The state is ``(epoch, shard position, samples taken from the shard)``; on resume
    the reader re-reads the current shard's prefix without decoding it, replaying the buffer exactly.

    Bad data is skipped and recorded (carried to the batch): an undecodable image, a missing or malformed label
    (when ``labels``), a missing caption (when ``captions``), no image member, a truncated or empty shard, and a
    shard whose sample count differs from the manifest.

    Memory per worker: ``shuffle_buffer`` encoded samples (1,000 ImageNet JPEGs ~ 110 MB; None: a whole shard),
    plus the DataLoader's ``prefetch_factor`` decoded batches.

    Args:
        urls: a shard specification for :func:`advtrain.data.expand_urls` (folder + ``split``, manifest, brace
            pattern, ``pipe:``/http(s) URLs, or a list).
        split: the split, for a folder or manifest.
        transform: ``transform(bytes, generator) -> (3, H, W) uint8``.
        labels: read the int label from ``label_key`` (a sample without one is bad); False: labels are None.
        captions: read the caption from ``caption_key`` (a sample without one is bad), e.g. img2dataset shards
            (jpg/png/webp + txt + json, no cls) for CLIP-text training.
        num_classes: labels outside ``[0, num_classes)`` are bad; None: any label >= 0.
        resampled: draw shards with replacement (see above).
        shards_per_epoch: with ``resampled``, shards each reader draws per epoch (default: its even share).
        shuffle_shards: permute the shard order each epoch (off for evaluation).
        shuffle_buffer: in-shard shuffle buffer size in samples; None: the whole shard; 0: tar order.
        epochs: stop after this many epochs (1 for evaluation); None: endless.
        counts: ``{url: samples}`` to check each shard against; default: the manifest's, when there is one.
        label_key, caption_key, image_keys: the members holding label, caption and image.
    """

    def __init__(
        self,
        urls,
        *,
        split: str | None = None,
        transform: Transform | None = None,
        labels: bool = True,
        captions: bool = False,
        num_classes: int | None = None,
        resampled: bool = False,
        shards_per_epoch: int | None = None,
        shuffle_shards: bool = True,
        shuffle_buffer: int | None = 1000,
        epochs: int | None = None,
        counts: dict[str, int] | None = None,
        label_key: str = "cls",
        caption_key: str = "txt",
        image_keys: tuple[str, ...] = IMAGE_KEYS,
    ):
        if not labels and not captions:
            raise ValueError("a ShardSource needs labels=True or captions=True (a sample with neither is unusable)")
        if shuffle_buffer is not None and shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0 or None; got {shuffle_buffer}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None; got {epochs}")
        if shards_per_epoch is not None and (shards_per_epoch < 1 or not resampled):
            raise ValueError(f"shards_per_epoch (got {shards_per_epoch}) is >= 1 and only for resampled=True")
        self.spec, self.split = urls, split
        self.urls = expand_urls(urls, split=split)
        self.counts = (
            counts
            if counts is not None
            else (manifest_counts(urls, split=split) if split is not None and isinstance(urls, (str, Path)) else None)
        )
        self.transform, self.labels, self.captions, self.num_classes = transform, labels, captions, num_classes
        self.resampled, self.shards_per_epoch, self.shuffle_shards = resampled, shards_per_epoch, shuffle_shards
        self.shuffle_buffer, self.epochs = shuffle_buffer, epochs
        self.label_key, self.caption_key, self.image_keys = label_key, caption_key, tuple(image_keys)
        self.seed, self.rank, self.world = 0, 0, 1
        self.state = {"epoch": 0, "shard": 0, "sample": 0}

    def bind(self, *, seed: int, rank: int = 0, world: int = 1) -> ShardSource:
        """A fresh copy for one rank of a run."""
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world); got rank {rank}, world {world}")
        out = copy.copy(self)
        out.seed, out.rank, out.world = seed, rank, world
        out.state = {"epoch": 0, "shard": 0, "sample": 0}
        return out

    # -- resumable state (called by torchdata inside each worker)
    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = {k: int(state[k]) for k in ("epoch", "shard", "sample")}

    # -- dealing
    def readers(self, num_workers: int) -> int:
        """How many readers share the shards: ``world x max(num_workers, 1)``."""
        return self.world * max(num_workers, 1)

    def shards_for(self, epoch: int, *, worker: int, num_workers: int) -> list[str]:
        """The shards reader ``(self.rank, worker)`` reads in ``epoch``, in order."""
        nw = max(num_workers, 1)
        reader, readers = self.rank * nw + worker, self.world * nw
        if self.resampled:
            k = self.shards_per_epoch or max(1, len(self.urls) // readers)
            g = sample_generator(self.seed, "resample", epoch, reader)
            return [self.urls[int(i)] for i in torch.randint(len(self.urls), (k,), generator=g)]
        order = (
            torch.randperm(len(self.urls), generator=sample_generator(self.seed, "shards", epoch)).tolist()
            if self.shuffle_shards
            else range(len(self.urls))
        )
        return [self.urls[i] for i in order][reader::readers]

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        self._reader = self.rank * nw + wid
        pending: list[BadSample] = []
        while self.epochs is None or self.state["epoch"] < self.epochs:
            epoch = self.state["epoch"]
            mine = self.shards_for(epoch, worker=wid, num_workers=nw)
            if not mine:
                if self.epochs is None:
                    raise ValueError(
                        f"{len(self.urls)} shards cannot feed {self.readers(nw)} readers (ranks x "
                        f"workers): use fewer workers, more shards, or resampled=True"
                    )
                return  # a finite pass (evaluation): this reader has nothing to read
            good, whole = 0, self.state["shard"] == 0 and self.state["sample"] == 0  # not a resumed tail
            while self.state["shard"] < len(mine):
                pos = self.state["shard"]
                for s in self._read(mine[pos], epoch, pos, pending):
                    good += 1
                    yield s._replace(bad=tuple(pending))
                    pending.clear()
                self.state = {"epoch": epoch, "shard": pos + 1, "sample": 0}
            self.state = {"epoch": epoch + 1, "shard": 0, "sample": 0}
            if pending and self.epochs is not None and self.state["epoch"] >= self.epochs:
                for r in pending:  # the end of a finite pass: no later sample carries these to a batch
                    log.warning("skipped bad data (%s) in %s %r: %s", r.kind, r.url, r.key, r.message)
            if good == 0 and whole and self.epochs is None:
                raise RuntimeError(
                    f"reader {self.rank}/{wid} read no usable sample in a whole epoch of "
                    f"{len(mine)} shards ({mine[:3]} ...): {pending[:3]}"
                )

    def _read(self, url: str, epoch: int, pos: int, pending: list[BadSample]) -> Iterator[Sample]:
        """One shard's usable samples from the state's sample position on; appends skip records to ``pending``."""
        # a resampled shard may recur within an epoch, and in another reader: salt its seeds with both
        salt = (self._reader, pos) if self.resampled else ()
        g = sample_generator(self.seed, "buffer", epoch, url, *salt)
        taken, last = self.state["sample"], None
        n = 0
        try:
            for raw in shuffled(iter_shard_samples(url), self.shuffle_buffer, generator=g):
                n += 1
                if n <= taken:
                    continue  # replaying the part of the shard read before a resume
                self.state["sample"] = n
                last = raw["__key__"]
                try:
                    yield self._prepare(raw, sample_generator(self.seed, epoch, url, raw["__key__"], *salt))
                except _Skip as skip:
                    pending.append(skip.record)
        except ShardReadError as err:
            expected = (self.counts or {}).get(url)
            lost = max(expected - n, 1) if expected is not None else 1
            kind = "empty" if n == 0 else "truncated"
            more = f"; the manifest says {expected} samples, {n} were read" if expected is not None else ""
            pending.append(BadSample(kind, url, last or "", f"{err}{more}", lost))
            return
        expected = (self.counts or {}).get(url)
        if n == 0:
            pending.append(
                BadSample(
                    "empty",
                    url,
                    "",
                    "the shard holds no sample" + (f" (the manifest says {expected})" if expected else ""),
                    max(expected or 1, 1),
                )
            )
        elif expected is not None and n != expected:
            pending.append(
                BadSample(
                    "manifest",
                    url,
                    "",
                    f"the shard holds {n} samples, the manifest says {expected}",
                    max(expected - n, 0),
                )
            )

    def _prepare(self, raw: dict, generator: torch.Generator) -> Sample:
        url, key = raw["__url__"], raw["__key__"]
        ext = next((k for k in self.image_keys if k in raw), None)
        if ext is None:
            members = sorted(k for k in raw if not k.startswith("__"))
            raise _Skip(BadSample("image", url, key, f"no image member among {list(self.image_keys)}; has {members}"))
        y = _label(raw.get(self.label_key), url=url, key=key, num_classes=self.num_classes) if self.labels else None
        cap = _caption(raw.get(self.caption_key), url=url, key=key) if self.captions else None
        x = _image(self.transform, raw[ext], generator, url=url, key=key)
        return Sample(x, y, cap, key, ())


def shuffled(items: Iterator, buffer: int | None, *, generator: torch.Generator) -> Iterator:
    """A seeded buffer shuffle: a pure function of the items and the generator's seed (so it can be replayed).

    ``buffer=None`` reads everything, then yields a uniform permutation; ``buffer=0`` (or 1) keeps the order;
    otherwise the classic shuffle buffer: fill ``buffer`` items, then for each new item yield a random buffered
    one and put the new one in its place; at the end yield the rest in random order. If ``items`` raises, the
    buffered items are still yielded (in random order) before the error propagates.
    """
    if buffer is not None and buffer <= 1:
        yield from items
        return
    buf: list = []
    error: BaseException | None = None
    try:
        for item in items:
            if buffer is None or len(buf) < buffer:
                buf.append(item)
                continue
            k = int(torch.randint(len(buf), (1,), generator=generator))
            buf[k], item = item, buf[k]
            yield item
    except ShardReadError as err:
        error = err
    for k in torch.randperm(len(buf), generator=generator).tolist():
        yield buf[k]
    if error is not None:
        raise error
