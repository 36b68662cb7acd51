"""Which samples an evaluation runs on: RobustBench's fixed ImageNet list, a seeded stratified subset, a rank's
share."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

#: RobustBench's 5,000 ImageNet validation images (robustbench 1.1.1, ``helper_files/imagenet_test_image_ids.txt``;
#: provenance and licence in ``advtrain/eval/subsets/README.md``).
ROBUSTBENCH_IMAGENET_FILE = Path(__file__).with_name("subsets") / "imagenet_test_image_ids.txt"
ROBUSTBENCH_IMAGENET_SHA256 = "d4121626d07722a0126c35b1563042e46a546f1a05ce705f2cdc635896d58574"

_VAL_ID = re.compile(r"ILSVRC2012_val_(\d{8})")


def robustbench_imagenet_ids(path: str | Path | None = None) -> list[str]:
    """RobustBench's 5,000 ImageNet validation images as ``<wnid>/ILSVRC2012_val_XXXXXXXX.JPEG``, in its order.

    Args:
        path: another copy of the list to read (default: the one shipped in ``advtrain/eval/subsets``); it must
            have the same sha256.

    Returns:
        5,000 strings; the first ``n`` are RobustBench's ``n_examples=n`` subset.

    Raises:
        FileNotFoundError: the list is missing (a broken install).
        ValueError: its sha256 differs from RobustBench 1.1.1's.

    Example:
        >>> ids = robustbench_imagenet_ids()
        >>> len(ids), ids[0]
        (5000, 'n09468604/ILSVRC2012_val_00015253.JPEG')

    References:
        Croce et al., "RobustBench: a standardized adversarial robustness benchmark", arXiv 2010.09670.
    """
    path = Path(path) if path is not None else ROBUSTBENCH_IMAGENET_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the RobustBench ImageNet subset list {str(path)!r} is missing")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != ROBUSTBENCH_IMAGENET_SHA256:
        raise ValueError(
            f"{str(path)!r} has sha256 {digest}, RobustBench 1.1.1's list has {ROBUSTBENCH_IMAGENET_SHA256}"
        )
    return raw.decode().split()


def imagenet_val_id(key: str) -> str | None:
    """The ``ILSVRC2012_val_XXXXXXXX`` id inside a sample key or path, or ``None``.

    Matches class-folder paths (``n01440764/ILSVRC2012_val_00000293.JPEG``) and WebDataset keys
    (``val/ILSVRC2012_val_00000293``) alike.

    Example:
        >>> imagenet_val_id("shard-3/ILSVRC2012_val_00000293"), imagenet_val_id("img_7")
        ('ILSVRC2012_val_00000293', None)
    """
    m = _VAL_ID.search(key)
    return m.group(0) if m else None


def robustbench_subset(
    keys: Sequence[str], labels: Sequence[int], *, n: int | None = None, ids: Sequence[str] | None = None
) -> list[int]:
    """Positions in ``keys`` of RobustBench's ImageNet images (the first ``n`` of its list), in the list's order.

    Samples are matched on their ``ILSVRC2012_val_XXXXXXXX`` id (:func:`imagenet_val_id`), so class folders and
    WebDataset shards both work. Labels are checked against the ImageNet-1k class order (sorted wnids, timm's
    ``ImageNetInfo``), the order RobustBench's loader assigns.

    Args:
        keys: one key (or relative path) per sample of the data.
        labels: the data's labels, aligned with ``keys``.
        n: take the first ``n`` images of the list (``1 <= n <= 5000``; default all).
        ids: the list to use (default :func:`robustbench_imagenet_ids`).

    Returns:
        ``n`` positions into ``keys``.

    Raises:
        ValueError: some listed image is not in the data (the count and the first few are named), a sample's
            label is not the ImageNet-1k index of its listed wnid, a bad ``n``, or the data holds an id twice.
    """
    ids = list(ids) if ids is not None else robustbench_imagenet_ids()
    if len(keys) != len(labels):
        raise ValueError(f"keys and labels must align; got {len(keys)} keys and {len(labels)} labels")
    if n is not None and not 1 <= n <= len(ids):
        raise ValueError(f"n must be in [1, {len(ids)}] for the RobustBench ImageNet list; got {n}")
    ids = ids[: n or len(ids)]
    where: dict[str, int] = {}
    for i, k in enumerate(keys):
        v = imagenet_val_id(k)
        if v is not None:
            if v in where:
                raise ValueError(f"the data holds {v} twice: {keys[where[v]]!r} and {k!r}")
            where[v] = i
    missing = [e for e in ids if imagenet_val_id(e) not in where]
    if missing:
        raise ValueError(
            f"{len(missing)} of the {len(ids)} RobustBench ImageNet images are not in the data "
            f"({len(keys)} samples, {len(where)} with an ILSVRC2012_val id), e.g. {missing[:3]}"
        )
    from timm.data import ImageNetInfo

    order = {w: i for i, w in enumerate(ImageNetInfo().label_names())}
    out, wrong = [], []
    for e in ids:
        i = where[imagenet_val_id(e)]
        expected = order[e.split("/")[0]]
        if int(labels[i]) != expected:
            wrong.append(f"{keys[i]}: label {int(labels[i])}, ImageNet-1k index of {e.split('/')[0]} is {expected}")
        out.append(i)
    if wrong:
        raise ValueError(
            f"{len(wrong)} of the {len(ids)} RobustBench images have labels outside the ImageNet-1k "
            f"class order (sorted wnids), e.g. {wrong[:3]}"
        )
    return out


def _rank(seed: int, *parts: object) -> int:
    text = "\x00".join([str(seed), *map(str, parts)]).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


def stratified_subset(keys: Sequence[str], labels: Sequence[int], *, n: int, seed: int) -> list[int]:
    r"""A seeded subset of ``n`` samples, stratified over classes: the same list for the same data on every run.

    Class :math:`k` with :math:`c_k` of the :math:`N` samples gets :math:`\lfloor n c_k / N \rfloor` places,
    and the remaining places go to the largest fractional parts (ties: a seeded hash of the class), so the
    subset keeps the class proportions (equal counts on a balanced set). Within a class, the samples with the
    smallest ``blake2b(seed, key)`` are taken. The choice depends only on the (key, label) pairs and the seed,
    not on the order the data is listed in, the platform or numpy's generator.

    Args:
        keys: unique sample keys.
        labels: their int labels.
        n: subset size, ``1 <= n``; ``n >= N`` takes every sample.
        seed: the subset's seed.

    Returns:
        Positions into ``keys``, sorted by key.

    Raises:
        ValueError: misaligned inputs, no samples, duplicate keys, or ``n < 1``.

    Example:
        >>> keys = [f"img{i}" for i in range(12)]
        >>> idx = stratified_subset(keys, [i % 3 for i in range(12)], n=6, seed=0)
        >>> sorted([i % 3 for i in idx])
        [0, 0, 1, 1, 2, 2]
    """
    if len(keys) != len(labels):
        raise ValueError(f"keys and labels must align; got {len(keys)} keys and {len(labels)} labels")
    if not keys:
        raise ValueError("no samples to choose a subset from")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1; got {n!r}")
    if len(set(keys)) != len(keys):
        raise ValueError(f"sample keys must be unique; {len(keys) - len(set(keys))} repeat")
    total = len(keys)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    if n >= total:
        return sorted(range(total), key=lambda i: keys[i])
    quota = {c: n * len(m) // total for c, m in by_class.items()}
    left = n - sum(quota.values())
    frac = sorted(by_class, key=lambda c: (-(n * len(by_class[c]) % total), _rank(seed, "class", c)))
    for c in frac[:left]:
        quota[c] += 1
    chosen = []
    for c, members in by_class.items():
        members.sort(key=lambda i: (_rank(seed, keys[i]), keys[i]))
        chosen += members[: quota[c]]
    return sorted(chosen, key=lambda i: keys[i])


def split_for_rank(items: Sequence[T], *, rank: int, world: int) -> list[T]:
    """Rank ``rank``'s share of ``items`` out of ``world``: every ``world``-th item from ``rank`` on.

    Strided, so each rank gets a similar mix of classes and the shares differ in size by at most one; together
    the shares are ``items``, each item in exactly one.

    Raises:
        ValueError: ``world < 1`` or ``rank`` outside ``[0, world)``.

    Example:
        >>> split_for_rank(list("abcde"), rank=1, world=2)
        ['b', 'd']
    """
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be an int >= 1; got {world!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank must be an int in [0, {world}); got {rank!r}")
    return list(items[rank::world])


def subset_digest(keys: Sequence[str]) -> str:
    """sha256 of the subset's keys joined by newlines, in order: names the exact subset in a report.

    Example:
        >>> subset_digest(["a", "b"])[:12]
        '7e18f737311b'
    """
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()
