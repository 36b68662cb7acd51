"""Small evaluation sets built in tmp_path from the real shared data: a shard folder and a class folder."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest


def copy_shard_samples(src: Path, dst_dir: Path, *, n: int, split: str = "val", per_shard: int | None = None) -> Path:
    """The first ``n`` samples of ``src/<split>-0000.tar.gz`` as uncompressed shards with a manifest in ``dst_dir``."""
    manifest = json.loads((src / "manifest.json").read_text())
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(src / f"{split}-0000.tar.gz") as t:
        for m in t:
            key, ext = m.name.split(".", 1)
            if key not in members and len(members) == n:
                break
            members.setdefault(key, {})[ext] = t.extractfile(m).read()
    dst_dir.mkdir(parents=True, exist_ok=True)
    keys = list(members)
    per_shard = per_shard or n
    shards = []
    for s, i in enumerate(range(0, n, per_shard)):
        name = f"{split}-{s:04d}.tar"
        with tarfile.open(dst_dir / name, "w") as t:
            for key in keys[i : i + per_shard]:
                for ext, data in members[key].items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
        raw = (dst_dir / name).read_bytes()
        shards.append(
            {
                "file": name,
                "count": len(keys[i : i + per_shard]),
                "bytes": len(raw),
                "sha256": hashlib.sha256(raw).hexdigest(),
            }
        )
    out = {k: manifest[k] for k in ("name", "classes", "class_names") if k in manifest}
    out["splits"] = {split: {"count": n, "shards": shards}}
    (dst_dir / "manifest.json").write_text(json.dumps(out))
    return dst_dir


def class_folder_from_shards(src: Path, dst_dir: Path, *, n: int, split: str = "val") -> Path:
    """The first ``n`` samples as ``dst_dir/<wnid>/<key>.jpg`` (an ImageNet-style class folder)."""
    manifest = json.loads((src / "manifest.json").read_text())
    seen = 0
    with tarfile.open(src / f"{split}-0000.tar.gz") as t:
        pending: dict[str, dict[str, bytes]] = {}
        for m in t:
            key, ext = m.name.split(".", 1)
            pending.setdefault(key, {})[ext] = t.extractfile(m).read()
            if {"jpg", "cls"} <= pending[key].keys():
                d = dst_dir / manifest["classes"][int(pending[key]["cls"])]
                d.mkdir(parents=True, exist_ok=True)
                (d / f"{key}.jpg").write_bytes(pending.pop(key)["jpg"])
                seen += 1
                if seen == n:
                    break
    return dst_dir


@pytest.fixture
def imagenette_shards(shared_datasets, tmp_path) -> Path:
    """40 imagenette validation samples (224 px JPEGs, 10 classes) in two uncompressed shards with a manifest."""
    return copy_shard_samples(shared_datasets / "imagenette224", tmp_path / "shards", n=40, per_shard=20)
