"""Decoding the shared WebDataset shards."""

from __future__ import annotations

import pytest
import torch

from advtrain.data import load_image_set, shard_paths


def test_mnist_and_cifar_decode_with_labels_and_captions(shared_datasets):
    m = load_image_set(shared_datasets / "mnist", "test", limit=50, verify=True)
    assert m.images.shape == (50, 1, 28, 28) and m.images.dtype == torch.uint8
    assert m.labels.dtype == torch.int64 and 0 <= int(m.labels.min()) and int(m.labels.max()) <= 9
    assert m.captions[0] == f"a photo of a {m.class_names[int(m.labels[0])]}."
    c = load_image_set(shared_datasets / "cifar10", "test", limit=20)
    assert c.images.shape == (20, 3, 32, 32)
    assert c.captions[3] == f"a photo of a {c.class_names[int(c.labels[3])]}."


def test_errors_name_the_problem(shared_datasets, tmp_path):
    with pytest.raises(ValueError, match="splits"):
        shard_paths(shared_datasets / "mnist", "validation")
    with pytest.raises(FileNotFoundError, match="manifest"):
        shard_paths(tmp_path, "train")
    with pytest.raises(ValueError, match="limit"):
        load_image_set(shared_datasets / "mnist", "test", limit=0)
