"""Subsets: RobustBench's fixed ImageNet list, the seeded stratified subset, the rank split."""

from __future__ import annotations

import hashlib
import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from advtrain.eval import (
    ROBUSTBENCH_IMAGENET_SHA256,
    imagenet_val_id,
    robustbench_imagenet_ids,
    robustbench_subset,
    split_for_rank,
    stratified_subset,
)
from advtrain.eval._subset import ROBUSTBENCH_IMAGENET_FILE


def _wnid_index():
    from timm.data import ImageNetInfo

    return {w: i for i, w in enumerate(ImageNetInfo().label_names())}


def test_the_shipped_list_is_robustbench_1_1_1s():
    raw = ROBUSTBENCH_IMAGENET_FILE.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == ROBUSTBENCH_IMAGENET_SHA256
    ids = robustbench_imagenet_ids()
    assert len(ids) == len(set(ids)) == 5000
    assert ids[0] == "n09468604/ILSVRC2012_val_00015253.JPEG"
    assert ids[-1] == "n13133613/ILSVRC2012_val_00025432.JPEG"
    assert all(imagenet_val_id(i) is not None for i in ids)
    assert len({i.split("/")[0] for i in ids}) == 997  # not stratified: 3 classes have no image


def test_a_changed_list_is_refused(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("\n".join(robustbench_imagenet_ids()[:-1]))
    with pytest.raises(ValueError, match="sha256"):
        robustbench_imagenet_ids(path)
    with pytest.raises(FileNotFoundError, match="missing"):
        robustbench_imagenet_ids(tmp_path / "none.txt")


def _fake_imagenet_val(extra: int = 300, seed: int = 0):
    """Keys and labels of a fake ImageNet val folder: the 5000 listed images and others, shuffled."""
    order = _wnid_index()
    ids = robustbench_imagenet_ids()
    wnids = list(order)
    rng = random.Random(seed)
    entries = list(ids) + [f"{rng.choice(wnids)}/ILSVRC2012_val_{90000 + i:08d}.JPEG" for i in range(extra)]
    rng.shuffle(entries)
    return entries, [order[e.split("/")[0]] for e in entries]


def test_robustbench_subset_is_the_list_in_its_order_on_every_listing():
    ids = robustbench_imagenet_ids()
    for seed in (0, 1):
        keys, labels = _fake_imagenet_val(seed=seed)
        idx = robustbench_subset(keys, labels)
        assert [keys[i] for i in idx] == ids
    idx = robustbench_subset(keys, labels, n=100)
    assert [keys[i] for i in idx] == ids[:100]


def test_robustbench_subset_matches_webdataset_keys():
    ids = robustbench_imagenet_ids()[:50]
    order = _wnid_index()
    keys = [f"imagenet-val-{j % 7:04d}/{i.split('/')[1].removesuffix('.JPEG')}" for j, i in enumerate(ids)]
    idx = robustbench_subset(keys, [order[i.split("/")[0]] for i in ids], ids=ids)
    assert idx == list(range(50))


def test_robustbench_subset_names_the_missing_images_and_wrong_labels():
    keys, labels = _fake_imagenet_val()
    ids = robustbench_imagenet_ids()
    gone = {keys.index(ids[3]), keys.index(ids[10])}
    k2 = [k for i, k in enumerate(keys) if i not in gone]
    l2 = [y for i, y in enumerate(labels) if i not in gone]
    with pytest.raises(ValueError, match=r"2 of the 5000 RobustBench ImageNet images are not in the data") as err:
        robustbench_subset(k2, l2)
    assert ids[3] in str(err.value)
    shifted = [(y + 1) % 1000 for y in labels]  # a folder missing its first class: every index off by one
    with pytest.raises(ValueError, match="5000 of the 5000 RobustBench images have labels outside"):
        robustbench_subset(keys, shifted)


def test_stratified_subset_keeps_class_proportions_and_is_the_same_on_every_run():
    rng = random.Random(0)
    keys = [f"img_{i:05d}" for i in range(1000)]
    labels = [0] * 500 + [1] * 300 + [2] * 150 + [3] * 50
    a = stratified_subset(keys, labels, n=100, seed=7)
    assert Counter(labels[i] for i in a) == {0: 50, 1: 30, 2: 15, 3: 5}
    perm = list(range(1000))
    rng.shuffle(perm)
    b = stratified_subset([keys[i] for i in perm], [labels[i] for i in perm], n=100, seed=7)
    assert [keys[perm[i]] for i in b] == [keys[i] for i in a]  # the listing order does not matter
    assert stratified_subset(keys, labels, n=100, seed=7) == a
    c = stratified_subset(keys, labels, n=100, seed=8)
    assert c != a and Counter(labels[i] for i in c) == Counter(labels[i] for i in a)


def test_stratified_subset_pinned_choice():
    # a pure function of (keys, labels, seed) through blake2b: pinned, so that any change of method shows up
    keys = [f"k{i}" for i in range(20)]
    labels = [i % 4 for i in range(20)]
    assert [keys[i] for i in stratified_subset(keys, labels, n=8, seed=0)] == [
        "k11",
        "k12",
        "k13",
        "k16",
        "k17",
        "k18",
        "k19",
        "k2",
    ]
    assert [keys[i] for i in stratified_subset(keys, labels, n=8, seed=1)] == [
        "k0",
        "k1",
        "k11",
        "k13",
        "k14",
        "k18",
        "k3",
        "k4",
    ]


@given(counts=st.lists(st.integers(1, 30), min_size=1, max_size=8), n=st.integers(1, 120), seed=st.integers(0, 99))
def test_stratified_subset_sizes(counts, n, seed):
    labels = [c for c, k in enumerate(counts) for _ in range(k)]
    keys = [f"s{i}" for i in range(len(labels))]
    idx = stratified_subset(keys, labels, n=n, seed=seed)
    total = len(labels)
    assert len(idx) == min(n, total) and len(set(idx)) == len(idx)
    got = Counter(labels[i] for i in idx)
    for c, k in enumerate(counts):  # within one of the proportional share
        assert abs(got[c] - min(n, total) * k / total) < 1 + 1e-9
        assert got[c] <= k


def test_stratified_subset_bad_input():
    with pytest.raises(ValueError, match="unique"):
        stratified_subset(["a", "a"], [0, 1], n=1, seed=0)
    with pytest.raises(ValueError, match="align"):
        stratified_subset(["a"], [0, 1], n=1, seed=0)
    with pytest.raises(ValueError, match="n must be"):
        stratified_subset(["a"], [0], n=0, seed=0)


@given(n=st.integers(0, 50), world=st.integers(1, 9))
def test_rank_split_is_a_partition(n, world):
    items = list(range(n))
    shares = [split_for_rank(items, rank=r, world=world) for r in range(world)]
    assert sorted(x for s in shares for x in s) == items
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_rank_split_bad_input():
    with pytest.raises(ValueError, match="rank"):
        split_for_rank([1], rank=2, world=2)
    with pytest.raises(ValueError, match="world"):
        split_for_rank([1], rank=0, world=0)
