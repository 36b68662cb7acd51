"""WebDataset shard access through the ``webdataset`` package: URL expansion and one shard's raw samples.

A shard is a tar file (optionally gzip-compressed) whose members ``<key>.<ext>`` group into samples by key.
``webdataset.gopen`` opens it: a local path, ``file:``, ``pipe:<command>`` (the command writes the tar to
stdout: ``pipe:aws s3 cp s3://bucket/train-0000.tar -``, ``pipe:gsutil cat ...``), ``http(s)://`` (through
``curl``, with retries), and the object-store schemes webdataset knows (``gs:``, ``ais:``, ``hf:``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

ShardErrorKind = Literal["open", "empty", "truncated"]

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # two letters at least: 'C:' is a Windows drive, not a scheme


class ShardReadError(OSError):
    """A shard could not be read to its end: it is missing, empty, truncated or corrupt, or its pipe failed.

    Attributes:
        url: the shard.
        kind: ``"open"`` (could not be opened), ``"empty"`` (no bytes / no tar header), ``"truncated"`` (the tar
            or gzip stream ends early or is corrupt, or a ``pipe:`` command exits non-zero).
        after_key: the key of the last sample read completely before the error (None: none was).
    """

    def __init__(self, url: str, kind: ShardErrorKind, after_key: str | None, cause: BaseException | str):
        self.url, self.kind, self.after_key = url, kind, after_key
        where = f"after sample {after_key!r}" if after_key is not None else "before its first sample"
        detail = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else cause
        super().__init__(f"shard {url} is {kind} ({where}): {detail}")

    def __reduce__(self):  # picklable across DataLoader worker processes
        return _rebuild_shard_error, (self.url, self.kind, self.after_key, self.args[0])


def _rebuild_shard_error(url, kind, after_key, message):
    err = ShardReadError.__new__(ShardReadError)
    err.url, err.kind, err.after_key = url, kind, after_key
    OSError.__init__(err, message)
    return err


def is_url(spec: str) -> bool:
    """Whether ``spec`` names a stream with a scheme (``pipe:``, ``http://``, ``s3://``...) rather than a path."""
    return bool(_SCHEME.match(spec)) and not spec.startswith("file:")


def local_path(url: str) -> Path | None:
    """The local file a shard URL names (a plain path or ``file:``), else None (pipe, http, object stores)."""
    if url.startswith("file:"):
        return Path(re.sub(r"^file://?", "/", url))
    return None if is_url(url) else Path(url)


def expand_urls(spec: str | Path | list | tuple, *, split: str | None = None) -> list[str]:
    """The shard URLs a specification names, in order.

    Accepted forms (lists and tuples are expanded element by element and concatenated):

    - a folder with ``manifest.json``: the shards of ``split`` the manifest lists (each must exist);
    - a ``manifest.json`` file: the same;
    - a folder without a manifest: ``<split>-*.tar*`` in it, sorted (every ``*.tar*`` when ``split`` is None);
    - anything else: a URL or path pattern, brace-expanded by webdataset (``train-{0000..0127}.tar``,
      ``pipe:curl -s https://host/train-{0..9}.tar``), several patterns joined by ``::``.

    Args:
        spec: the specification.
        split: the split of a manifest or folder (``"train"``, ``"val"``); required for a manifest.

    Returns:
        A non-empty list of URLs / paths as strings.

    Raises:
        ValueError: a manifest without ``split``, an unknown split, or nothing matched.
        FileNotFoundError: a shard the manifest lists is missing.
        TypeError: ``spec`` is not a str, Path, list or tuple.

    Example:
        >>> expand_urls("pipe:cat /data/train-{0000..0002}.tar")
        ['pipe:cat /data/train-0000.tar', 'pipe:cat /data/train-0001.tar', 'pipe:cat /data/train-0002.tar']
    """
    from webdataset.shardlists import expand_urls as wds_expand

    if isinstance(spec, (list, tuple)):
        return [u for s in spec for u in expand_urls(s, split=split)]
    if isinstance(spec, Path):
        spec = str(spec)
    if not isinstance(spec, str):
        raise TypeError(f"a shard specification is a str, Path or list of them; got {type(spec).__name__}")
    if not is_url(spec):
        root = _manifest_root(Path(spec))
        if root is not None:
            return [str(p) for p in _manifest_shards(root, split)]
        if Path(spec).is_dir():
            pattern = f"{split}-*.tar*" if split else "*.tar*"
            found = sorted(str(p) for p in Path(spec).glob(pattern))
            if not found:
                raise ValueError(f"no {pattern} shards and no manifest.json in {spec}")
            return found
    urls = wds_expand(spec)
    if not urls:
        raise ValueError(f"shard specification {spec!r} expands to no URL")
    return urls


def manifest_counts(spec: str | Path, *, split: str) -> dict[str, int] | None:
    """``{shard url: sample count}`` from a folder's ``manifest.json`` (or the manifest itself), else None.

    The keys are the strings :func:`expand_urls` returns for the same ``spec``, so a reader can compare what it
    read from each shard with what the manifest promises.
    """
    if isinstance(spec, str) and is_url(spec):
        return None
    root = _manifest_root(Path(spec))
    if root is None:
        return None
    manifest = json.loads((root / "manifest.json").read_text())
    shards = manifest.get("splits", {}).get(split, {}).get("shards", [])
    if not all("count" in s for s in shards):
        return None
    return {str(root / s["file"]): int(s["count"]) for s in shards}


def _manifest_root(path: Path) -> Path | None:
    if path.is_dir() and (path / "manifest.json").exists():
        return path
    if path.name == "manifest.json" and path.is_file():
        return path.parent
    return None


def _manifest_shards(root: Path, split: str | None) -> list[Path]:
    from advtrain.data._shards import shard_paths

    if split is None:
        raise ValueError(f"{root} has a manifest.json: pass split= (one of its splits)")
    return shard_paths(root, split)


def iter_shard_samples(url: str) -> Iterator[dict]:
    """The raw samples of one WebDataset shard, in tar order, read with webdataset's gopen and tar iterators.

    Each sample is ``{"__key__": str, "__url__": url, "<ext>": bytes, ...}`` (extensions lower-cased, e.g.
    ``"jpg"``, ``"cls"``, ``"txt"``, ``"json"``). Memory: one sample's bytes at a time.

    Args:
        url: a local path, ``file:``, ``pipe:<command>``, ``http(s)://`` (needs ``curl``) or another gopen scheme.

    Yields:
        One dict per sample.

    Raises:
        ShardReadError: naming ``url`` and the last complete sample, when the shard cannot be opened, is empty,
            ends early (truncated tar or gzip), is corrupt, or its ``pipe:`` command exits non-zero. Samples
            before the error have been yielded.
    """
    from webdataset.gopen import gopen
    from webdataset.tariterators import group_by_keys

    try:
        stream = gopen(url, "rb")
    except Exception as err:  # FileNotFoundError, a missing curl, a refused scheme...
        raise ShardReadError(url, "open", None, err) from err
    last, done = None, False
    try:
        for sample in group_by_keys(_tar_members(stream, url)):
            last = sample["__key__"]
            yield sample
        done = True
    except GeneratorExit:
        raise
    except Exception as err:
        closing = _close(stream)
        cause = f"{type(err).__name__}: {err}"
        cause += f"; closing the stream: {closing}" if closing and closing != cause else ""
        empty = last is None and ("empty file" in str(err) or isinstance(err, EOFError) and "empty" in str(err))
        raise ShardReadError(url, "empty" if empty else "truncated", last, cause) from err
    finally:
        closing = _close(stream)
        if done and closing:  # e.g. a pipe: command that failed after writing a valid prefix
            raise ShardReadError(url, "truncated", last, closing)


def _tar_members(stream, url: str) -> Iterator[dict]:
    """``{"fname", "data", "__url__"}`` for each regular member of a tar stream; raises on a missing end marker.

    Python's tarfile stops silently when a stream ends at or inside a member header; a complete tar ends with two
    zero blocks, so after the first one (where tarfile stops) the next 512 bytes must be zeros too.
    """
    import tarfile

    tar = tarfile.open(fileobj=stream, mode="r|*")
    for info in tar:
        if not info.isreg() or re.match(r"__[^/]*__($|/)", info.name):  # webdataset's meta files
            continue
        yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": url}
        tar.members = []  # a stream of millions of members: keep none of them
    rest = tar.fileobj.read(tarfile.BLOCKSIZE)
    if len(rest) != tarfile.BLOCKSIZE or rest.count(0) != tarfile.BLOCKSIZE:
        raise tarfile.ReadError("the tar stream ends without its end-of-archive blocks")


def _close(stream) -> str | None:
    """Closes a gopen stream; the error it raises (a pipe's non-zero exit status) as a string, else None."""
    try:
        stream.close()
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None
