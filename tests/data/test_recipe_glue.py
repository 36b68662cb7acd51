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
