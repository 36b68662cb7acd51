"""Captions of WebDataset image-text shards (``<key>.txt``), for the frozen-text contrastive loss."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def read_captions(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> dict[str, str]:
    r"""Maps each sample key of WebDataset shards to its caption, the UTF-8 text of ``<key>.txt``.

    Reads the shards in the order given with the ``webdataset`` package (plain or gzip-compressed tar, local paths or
    any URL it understands, e.g. ``pipe:``), skipping the image bytes' decoding. Captions are stripped of surrounding
    whitespace. Samples without a ``.txt`` member are left out. Pair the captions with images by key, and embed them
    with :func:`embed_texts` (a :class:`TextCache` embeds each distinct caption once).

    Args:
        shards: one shard or a list of shards, e.g. ``sorted(Path("../shared/datasets/mnist").glob("train-*.tar.gz"))``,
            or WebDataset's brace notation, ``"../shared/datasets/mnist/train-{0000..0005}.tar.gz"``.

    Returns:
        ``{key: caption}`` in reading order.

    Raises:
        TypeError: ``shards`` neither a path nor a sequence of paths.
        ValueError: no shards, or a key present twice (in one shard or across shards).
        FileNotFoundError: a local shard that does not exist.

    Example:
        >>> import io, tarfile, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "shard.tar")
        >>> with tarfile.open(path, "w") as tar:
        ...     for name, data in [("s0.txt", b"a photo of a cat. "), ("s0.cls", b"3")]:
        ...         info = tarfile.TarInfo(name); info.size = len(data); tar.addfile(info, io.BytesIO(data))
        >>> read_captions(path)
        {'s0': 'a photo of a cat.'}

    References:
        Schuhmann et al., "LAION-5B: An open large-scale dataset for training next generation image-text models",
        arXiv 2210.08402 (the img2dataset WebDataset layout).
        Wang et al., "Revisiting Adversarial Training at Scale" (AdvXL), arXiv 2401.04727.
    """
    import webdataset as wds
    from braceexpand import braceexpand

    if isinstance(shards, (str, os.PathLike)):
        shards = [shards]
    if not isinstance(shards, Sequence) or not all(isinstance(s, (str, os.PathLike)) for s in shards):
        raise TypeError(f"shards must be a path or a sequence of paths; got {shards!r}")
    if len(shards) == 0:
        raise ValueError("shards is empty: no shard to read")
    urls = [url for s in shards for url in braceexpand(os.fspath(s))]  # a dependency of webdataset
    for url in urls:
        if "://" not in url and not url.startswith("pipe:") and not Path(url).exists():
            raise FileNotFoundError(f"shard not found: {url}")
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False, select_files=_is_caption)
    captions: dict[str, str] = {}
    for sample in dataset:
        if "txt" not in sample:
            continue
        key = sample["__key__"]
        if key in captions:
            raise ValueError(
                f"sample key {key!r} appears twice (again in {sample.get('__url__')}); keys must be unique"
            )
        captions[key] = sample["txt"].decode("utf-8").strip()
    return captions


def _is_caption(member_name: str) -> bool:
    return member_name.endswith(".txt")
