"""read_captions on the shared WebDataset shards and on hand-made ones."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch

from advtrain.losses import TextCache, embed_texts, read_captions


def _write_shard(path, members: list[tuple[str, bytes]], mode: str = "w") -> None:
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.shared_data
def test_captions_of_a_shared_shard_match_its_labels(shared_datasets, tower):
    shard = shared_datasets / "mnist" / "test-0000.tar.gz"
    class_names = json.loads((shared_datasets / "mnist" / "manifest.json").read_text())["class_names"]
    captions = read_captions(shard)
    labels = {}  # an independent reading of the .cls members, with tarfile
    with tarfile.open(shard, "r:gz") as tar:
        for member in tar:
            if member.name.endswith(".cls"):
                labels[member.name[: -len(".cls")]] = int(tar.extractfile(member).read())
    assert len(captions) == len(labels) == 10000
    assert all(captions[key] == f"a photo of a {class_names[c]}." for key, c in labels.items())
    # embedding them: each distinct caption once
    cache = TextCache()
    keys = list(captions)[:256]
    g = embed_texts(tower, [captions[k] for k in keys], cache=cache)
    assert g.shape == (256, tower.embed_dim) and len(cache) == len({captions[k] for k in keys}) <= 10


def test_several_gzip_shards_in_order(tmp_path):
    a, b = tmp_path / "a.tar.gz", tmp_path / "b.tar"
    _write_shard(a, [("k0.txt", "  a photo of a café.\n".encode()), ("k0.cls", b"1"), ("k1.txt", b"two")], "w:gz")
    _write_shard(b, [("k2.png", b"\x89PNG"), ("k2.txt", b"three"), ("k3.png", b"\x89PNG")])  # k3: no caption
    assert read_captions([a, str(b)]) == {"k0": "a photo of a café.", "k1": "two", "k2": "three"}


def test_brace_notation_names_a_shard_range(tmp_path):
    for i in range(2):
        _write_shard(tmp_path / f"s-{i:04d}.tar", [(f"k{i}.txt", f"caption {i}".encode())])
    assert read_captions(str(tmp_path / "s-{0000..0001}.tar")) == {"k0": "caption 0", "k1": "caption 1"}


def test_duplicate_keys_raise(tmp_path):
    a = tmp_path / "a.tar"
    _write_shard(a, [("k0.txt", b"one")])
    with pytest.raises(ValueError, match="k0"):
        read_captions([a, a])


@pytest.mark.parametrize(("shards", "error"), [([], ValueError), (3, TypeError), ([None], TypeError)])
def test_bad_shards_raise(shards, error):
    with pytest.raises(error):
        read_captions(shards)


def test_missing_shard_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_captions(tmp_path / "absent.tar.gz")


def test_embedding_order_follows_the_keys(tmp_path, tower):
    a = tmp_path / "a.tar"
    _write_shard(a, [("k0.txt", b"a photo of a 1."), ("k1.txt", b"a photo of a 2."), ("k2.txt", b"a photo of a 1.")])
    captions = read_captions(a)
    g = embed_texts(tower, list(captions.values()))
    assert torch.equal(g[0], g[2]) and not torch.equal(g[0], g[1])
