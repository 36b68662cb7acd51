"""Build small WebDataset shard folders in tests."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def write_shard(path: Path, samples: list[dict], *, gzip: bool = False) -> Path:
    """Writes ``samples`` (``{"__key__": str, ext: bytes, ...}``) as a tar (``.tar.gz`` when ``gzip``)."""
    with tarfile.open(path, "w:gz" if gzip else "w") as tar:
        for s in samples:
            for ext, data in s.items():
                if ext.startswith("__"):
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def write_shards(root: Path, samples: list[dict], sizes: list[int], *, prefix: str = "train") -> list[str]:
    """Splits ``samples`` into shards of ``sizes`` under ``root``; returns their paths."""
    root.mkdir(parents=True, exist_ok=True)
    paths, start = [], 0
    for i, n in enumerate(sizes):
        paths.append(str(write_shard(root / f"{prefix}-{i:04d}.tar", samples[start : start + n])))
        start += n
    return paths


def keyed(samples: list[dict], prefix: str) -> list[dict]:
    """Copies of ``samples`` with keys ``<prefix>_<i>`` (to make more distinct samples from the same images)."""
    return [{**s, "__key__": f"{prefix}_{i:05d}"} for i, s in enumerate(samples)]
