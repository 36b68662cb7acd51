"""advtrain.data's glue for the recipes: split_sources / sources_from_config, epoch sizes, evaluation subsets."""

from __future__ import annotations

import pytest
import torch

from advtrain.data import (
    AugmentConfig,
    DataConfig,
    ShardSource,
    TensorSource,
    epoch_size,
    eval_subset,
    sources_from_config,
    split_sources,
    val_transform,
)


def test_digits_sources_and_a_seeded_evaluation_subset():
    train, val = sources_from_config(DataConfig(kind="digits", crop_pct=1.0), AugmentConfig(), size=32, seed=0)
    assert isinstance(train, TensorSource) and epoch_size(train) == 1347 and epoch_size(train, 40) == 40
    images, labels = eval_subset(val, 8, seed=3)
    assert len(images) == 8 and images[0].shape == (3, 32, 32) and all(0 <= y < 10 for y in labels)
    again, _ = eval_subset(val, 8, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(images, again))


def test_shard_specs(shared_datasets, tmp_path):
    root = str(shared_datasets / "imagenette224")
    vt = val_transform(size=32)
    train, val = split_sources("wds", path=root, train_transform=vt, val_transform=vt)
    assert isinstance(train, ShardSource) and epoch_size(train) == 3000 and val.epochs == 1
    pattern = root + "/train-{0000..0001}.tar.gz"
    with pytest.raises(ValueError, match="data.val_path"):
        split_sources("wds", path=pattern, train_transform=vt, val_transform=vt)
    train, val = split_sources(
        "wds", path=pattern, val_path=root + "/val-0000.tar.gz", train_transform=vt, val_transform=vt, resampled=True
    )
    assert len(train.urls) == 2 and train.resampled and len(val.urls) == 1 and epoch_size(train) is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        split_sources("folder", path=str(tmp_path / "nowhere"), train_transform=vt, val_transform=vt)
    with pytest.raises(ValueError, match="data.kind"):
        split_sources("lmdb", path=root, train_transform=vt, val_transform=vt)


def _tiny_folder(root, *, caption: bool):
    """A WebDataset folder with a manifest: 2 train and 2 val samples, 8 px JPEGs, with or without captions."""
    import io
    import json
    import tarfile

    from PIL import Image

    root.mkdir()
    splits = {}
    for split in ("train", "val"):
        name = f"{split}-0000.tar"
        with tarfile.open(root / name, "w") as tar:
            for i in range(2):
                buf = io.BytesIO()
                Image.new("RGB", (8, 8), (40 * i, 90, 100)).save(buf, "JPEG")
                members = {"jpg": buf.getvalue(), "cls": str(i).encode()}
                if caption:
                    members["txt"] = f"a photo of class {i}.".encode()
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{split}{i}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        splits[split] = {"count": 2, "shards": [{"file": name, "count": 2}]}
    (root / "manifest.json").write_text(json.dumps({"splits": splits, "class_names": ["a", "b"]}))


def test_in_memory_shards_carry_captions_when_asked(tmp_path):
    _tiny_folder(tmp_path / "with", caption=True)
    cfg = DataConfig(kind="wds", path=str(tmp_path / "with"), in_memory=True, crop_pct=1.0)
    train, _ = sources_from_config(cfg, AugmentConfig(), size=8, seed=0, labels=False, captions=True)
    assert train.captions == ["a photo of class 0.", "a photo of class 1."] and train.labels is None
    train, _ = sources_from_config(cfg, AugmentConfig(), size=8, seed=0)
    assert train.captions is None and train.labels.tolist() == [0, 1]
    _tiny_folder(tmp_path / "without", caption=False)
    cfg = DataConfig(kind="wds", path=str(tmp_path / "without"), in_memory=True, crop_pct=1.0)
    with pytest.raises(ValueError, match=r"captions requested but 2 of 2 samples .* have no \.txt caption"):
        sources_from_config(cfg, AugmentConfig(), size=8, seed=0, labels=False, captions=True)
