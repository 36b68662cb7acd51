"""The evaluation command's data: list a class folder or WebDataset shards, pick the subset, decode it in order.

Samples are listed first (keys and labels only), the subset is chosen from that list, and only the chosen
images are decoded, in the data's order, by a thread pool that keeps the order (so batches, and with them
AutoAttack's results, do not depend on the number of workers).
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")
LABEL_EXTS = ("cls", "cls.txt", "label", "target")


class EvalSample(NamedTuple):
    """One listed sample: its unique key, label, and where its bytes are (a file path, or a shard URL)."""

    key: str
    label: int
    where: str


class DataIndex(NamedTuple):
    """Every sample of an evaluation set, in the data's order, and what is known of its classes."""

    kind: str  # "folder" or "shards"
    samples: list[EvalSample]
    classes: list[str] | None  # class ids (folder names, a manifest's "classes"), label order; None: unknown
    class_names: list[str] | None  # readable names (a manifest's "class_names"), label order
    urls: list[str]  # the shards ([] for a folder)
    prefixed: bool = False  # shard keys are "<shard file name>/<__key__>" (a __key__ repeats across shards)

    @property
    def num_classes(self) -> int:
        """The declared class count (folders, manifests), else the largest label + 1."""
        if self.classes is not None:
            return len(self.classes)
        return max(s.label for s in self.samples) + 1


def index_folder(root: str | Path) -> DataIndex:
    """Lists ``root/<class>/<image>`` like torchvision's ``ImageFolder`` (sorted classes, then files).

    Keys are the paths relative to ``root`` (``n01440764/ILSVRC2012_val_00000293.JPEG``).

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: no class folders or no images.
    """
    from torchvision.datasets.folder import find_classes, make_dataset

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist")
    try:
        classes, class_to_idx = find_classes(str(root))
        listed = make_dataset(str(root), class_to_idx, extensions=tuple(f".{e}" for e in IMAGE_EXTS))
    except (FileNotFoundError, RuntimeError) as err:
        raise ValueError(f"{root} is not a class folder (root/<class>/<image>): {err}") from None
    samples = [EvalSample(os.path.relpath(p, root).replace(os.sep, "/"), int(y), p) for p, y in listed]
    if not samples:
        raise ValueError(f"no images in the class folders of {root}")
    return DataIndex("folder", samples, list(classes), None, [])


def index_shards(spec: str | Path | Sequence[str], *, split: str | None, cache: str | Path | None = None) -> DataIndex:
    """Lists the samples of WebDataset shards (one pass reading keys and labels), cached in ``cache``.

    Keys are the samples' ``__key__``; when a key repeats across shards, every key becomes
    ``<shard file name>/<key>``. Classes come from a ``manifest.json`` next to the shards (``classes``,
    ``class_names``) when there is one.

    Args:
        spec: what :func:`advtrain.data.expand_urls` takes (a folder with a manifest, a pattern, a list).
        split: the manifest's or folder's split (``"val"``).
        cache: a JSON file to keep the listing in; reused while the local shards keep their sizes and times.

    Raises:
        ValueError: no shards, a sample without an image or a label, a malformed label.
        advtrain.data.ShardReadError: a shard that cannot be read.
    """
    from advtrain.data import expand_urls, iter_shard_samples

    urls = expand_urls(spec if not isinstance(spec, Path) else str(spec), split=split)
    stamp = [_stamp(u) for u in urls]
    if cache is not None and Path(cache).exists():
        c = json.loads(Path(cache).read_text())
        if c.get("urls") == urls and c.get("stamp") == stamp:
            samples = [EvalSample(k, int(y), urls[i]) for i, k, y in c["samples"]]
            return DataIndex("shards", samples, c["classes"], c["class_names"], urls, c["prefixed"])
    raw: list[tuple[int, str, int]] = []
    for i, url in enumerate(urls):
        for s in iter_shard_samples(url):
            key = s["__key__"]
            if not any(e in s for e in IMAGE_EXTS):
                raise ValueError(
                    f"sample {key!r} of {url} has no image ({sorted(k for k in s if not k.startswith('__'))})"
                )
            lab = next((s[e] for e in LABEL_EXTS if e in s), None)
            if lab is None:
                raise ValueError(f"sample {key!r} of {url} has no label (.cls)")
            try:
                y = int(lab.decode("ascii").strip())
            except (ValueError, UnicodeDecodeError):
                raise ValueError(f"sample {key!r} of {url} has a malformed label {bytes(lab)[:32]!r}") from None
            raw.append((i, key, y))
    if not raw:
        raise ValueError(f"no samples in the shards {urls[:3]}")
    keys = [k for _, k, _ in raw]
    prefixed = len(set(keys)) != len(keys)
    if prefixed:
        raw = [(i, f"{Path(urls[i]).name}/{k}", y) for i, k, y in raw]
        if len({k for _, k, _ in raw}) != len(raw):
            raise ValueError("sample keys repeat within a shard")
    classes, names = _manifest_classes(urls)
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        Path(cache).write_text(
            json.dumps(
                {
                    "urls": urls,
                    "stamp": stamp,
                    "classes": classes,
                    "class_names": names,
                    "prefixed": prefixed,
                    "samples": raw,
                }
            )
        )
    return DataIndex("shards", [EvalSample(k, y, urls[i]) for i, k, y in raw], classes, names, urls, prefixed)


def _stamp(url: str) -> list | None:
    from advtrain.data._webdataset import local_path

    p = local_path(url)
    if p is None or not p.exists():
        return None
    st = p.stat()
    return [st.st_size, st.st_mtime_ns]


def _manifest_classes(urls: list[str]) -> tuple[list[str] | None, list[str] | None]:
    from advtrain.data._webdataset import local_path

    p = local_path(urls[0])
    if p is None or not (p.parent / "manifest.json").exists():
        return None, None
    m = json.loads((p.parent / "manifest.json").read_text())
    classes = [str(c) for c in m["classes"]] if isinstance(m.get("classes"), list) else None
    names = [str(c) for c in m["class_names"]] if isinstance(m.get("class_names"), list) else None
    if classes is None and names is not None:
        classes = names
    return classes, names


def index_data(
    path: str, *, kind: str = "auto", split: str | None = "val", cache: str | Path | None = None
) -> DataIndex:
    """A class folder (``kind="folder"``) or WebDataset shards (``"shards"``); ``"auto"`` tells them apart.

    ``auto``: a folder holding ``manifest.json`` or ``*.tar*`` files, a ``.tar`` pattern or a URL are shards; any
    other folder is a class folder (``path/<split>`` is used when it exists, as in ImageNet's ``root/val``).

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: an unknown ``kind``, or what :func:`index_folder` / :func:`index_shards` raise.
    """
    if kind not in ("auto", "folder", "shards"):
        raise ValueError(f"data kind must be 'auto', 'folder' or 'shards'; got {kind!r}")
    p = Path(path)
    if kind == "auto":
        shards = (
            ".tar" in path
            or "://" in path
            or path.startswith("pipe:")
            or (p.is_dir() and ((p / "manifest.json").exists() or any(p.glob("*.tar*"))))
        )
        if not shards and not p.exists():
            raise FileNotFoundError(f"data {path!r} does not exist")
        kind = "shards" if shards else "folder"
    if kind == "folder":
        return index_folder(p / split if split and (p / split).is_dir() else p)
    return index_shards(path, split=split, cache=cache)


def imagenet_label_map(classes: Sequence[str]) -> list[int]:
    """ImageNet-1k indices of wnid class ids (``n01440764`` -> 0), to evaluate 1000-way models on a subset.

    Raises:
        ValueError: a class id that is not an ImageNet-1k wnid.

    Example:
        >>> imagenet_label_map(["n01440764", "n02102040"])
        [0, 217]
    """
    from timm.data import ImageNetInfo

    order = {w: i for i, w in enumerate(ImageNetInfo().label_names())}
    bad = [c for c in classes if c not in order]
    if bad:
        raise ValueError(f"{len(bad)} class ids are not ImageNet-1k wnids (e.g. {bad[:3]}): cannot map to 1000 classes")
    return [order[c] for c in classes]


def _shard_bytes(index: DataIndex, chosen: Sequence[EvalSample]) -> Iterator[tuple[EvalSample, bytes]]:
    from advtrain.data import iter_shard_samples

    by_key = {s.key: s for s in chosen}
    urls = [u for u in index.urls if any(s.where == u for s in chosen)]
    for url in urls:
        for raw in iter_shard_samples(url):
            key = f"{Path(url).name}/{raw['__key__']}" if index.prefixed else raw["__key__"]
            s = by_key.get(key)
            if s is not None and s.where == url:
                yield s, raw[next(e for e in IMAGE_EXTS if e in raw)]


def iter_image_batches(
    index: DataIndex,
    chosen: Sequence[EvalSample],
    *,
    transform: Callable[[bytes], Tensor],
    batch_size: int,
    workers: int = 4,
    label_map: Sequence[int] | None = None,
) -> Iterator[tuple[Tensor, Tensor, list[str]]]:
    """``(uint8 (B, 3, S, S), int64 (B,) labels, keys)`` batches of the ``chosen`` samples, in the data's order.

    Files are read and decoded by ``workers`` threads (Pillow releases the GIL), one batch ahead, in order.

    Raises:
        ValueError: an image that does not decode (naming its key).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    order = {s.key: i for i, s in enumerate(index.samples)}
    chosen = sorted(chosen, key=lambda s: order[s.key])
    if index.kind == "folder":
        items: Iterable = ((s, s.where) for s in chosen)
    else:
        items = _shard_bytes(index, chosen)

    def load(item) -> Tensor:
        s, src = item
        data = Path(src).read_bytes() if isinstance(src, str) else src
        try:
            return transform(data)
        except Exception as err:  # noqa: BLE001 - Pillow raises OSError, ValueError, SyntaxError on bad files
            raise ValueError(f"cannot decode sample {s.key!r} ({s.where}): {type(err).__name__}: {err}") from None

    def pack(batch, futures):
        images = torch.stack([f.result() for f in futures])
        labels = torch.tensor([label_map[s.label] if label_map else s.label for s in batch], dtype=torch.int64)
        return images, labels, [s.key for s in batch]

    with ThreadPoolExecutor(max(1, workers)) as pool:
        pending: deque = deque()
        batch: list = []
        futures: list = []
        for item in items:
            batch.append(item[0])
            futures.append(pool.submit(load, item))
            if len(batch) == batch_size:
                pending.append((batch, futures))
                batch, futures = [], []
                if len(pending) > 1:  # one batch decoding ahead of the one handed out
                    yield pack(*pending.popleft())
        if batch:
            pending.append((batch, futures))
        while pending:
            yield pack(*pending.popleft())


def eval_transform(*, size: int, crop_pct: float, interpolation: str) -> Callable[[bytes], Tensor]:
    """Full-size Pillow decode, then :func:`advtrain.data.val_transform` (timm's resize + center crop, pixel-exact).

    No DCT-domain downscaling: the pixels are those of timm's and RobustBench's evaluation pipelines.
    """
    from advtrain.data import decode_image, val_transform

    t = val_transform(size=size, crop_pct=crop_pct, interpolation=interpolation)

    def transform(data: bytes) -> Tensor:
        return t(decode_image(data, decoder="pillow"))

    return transform
