"""Distribution-shift sets from folders (advtrain.eval.shift_eval): ImageNet-C's release layout, ImageNet-R's
200-class mask, Stylized-ImageNet's 1000 classes, the on-the-fly fallback's label, and the before-training checks.

The folders are built in tmp_path from real imagenette224 JPEGs (10 real ImageNet wnids, from its manifest)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
from torch import nn

from advtrain.data import DataConfig, ImageFolderSource, val_transform
from advtrain.eval import (
    ALEXNET_ERRORS,
    check_shift_sets,
    class_folder_error,
    imagenet_c_errors,
    imagenet_classes,
    mean_corruption_error,
    model_classes,
    shift_eval,
    shift_table,
)


def imagenette_jpegs(datasets: Path, n: int) -> tuple[list[str], list[tuple[bytes, str]]]:
    """(the 10 wnids in label order, the first ``n`` val samples as (JPEG bytes, wnid))."""
    root = datasets / "imagenette224"
    classes = json.loads((root / "manifest.json").read_text())["classes"]
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(root / "val-0000.tar.gz") as t:
        for m in t:
            key, ext = m.name.split(".", 1)
            if key not in members and len(members) == n:
                break
            members.setdefault(key, {})[ext] = t.extractfile(m).read()
    out = [(s["jpg"], classes[int(s["cls"])]) for s in members.values() if "jpg" in s]
    return classes, out


def write_folder(root: Path, samples: list[tuple[bytes, str]], ext: str = ".JPEG") -> Path:
    for i, (data, wnid) in enumerate(samples):
        (root / wnid).mkdir(parents=True, exist_ok=True)
        (root / wnid / f"img_{i:04d}{ext}").write_bytes(data)
    return root


class Constant(nn.Module):
    """The same logits for every image: predicts ``k`` (error = the fraction of labels != k)."""

    def __init__(self, k: int, classes: int):
        super().__init__()
        self.k, self.classes = k, classes

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.classes)
        out[:, self.k] = 1.0
        return out


class Lookup(nn.Module):
    """Knows each image's class by its pixel sum: logits 10 at the true class, ``decoy`` 50 (an argmax elsewhere)."""

    def __init__(self, table: dict[int, int], classes: int, decoy: int | None = None):
        super().__init__()
        self.table, self.classes, self.decoy = table, classes, decoy

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.classes)
        for i, img in enumerate(x):
            out[i, self.table[int(torch.round(img.double().sum() * 255))]] = 10.0
            if self.decoy is not None:
                out[i, self.decoy] = 50.0
        return out


def lookup_table(samples, classes: list[str], *, size: int, crop_pct: float) -> dict[int, int]:
    t = val_transform(size=size, crop_pct=crop_pct)
    table = {int(t(data).to(torch.int64).sum()): classes.index(wnid) for data, wnid in samples}
    assert len(table) == len(samples)  # pixel sums tell these photos apart
    return table


def test_imagenet_c_release_layout_scores_every_pair_with_the_model_labels_and_reports_the_mce(
    tmp_path, shared_datasets
):
    wnids, samples = imagenette_jpegs(shared_datasets, 12)
    classes = wnids[::-1]  # the model's label order is not the folder's sorted order
    root = tmp_path / "imagenet-c"
    k = classes.index(samples[0][1])  # a constant model predicts the first sample's class
    expected = {}
    for c in ("brightness", "contrast"):
        expected[c] = []
        for s in (1, 2, 3, 4, 5):
            part = samples[: 6 + s]  # folders of different sizes: different errors per pair
            write_folder(root / c / str(s), part)
            expected[c].append(sum(w != samples[0][1] for _, w in part) / len(part))
    got = imagenet_c_errors(Constant(k, 10), root, classes=classes, corruptions=("brightness", "contrast"),
                            severities=(1, 2, 3, 4, 5), size=32)  # fmt: skip
    assert got["corruption_errors"] == {c: pytest.approx(v) for c, v in expected.items()}
    assert got["corruption_error"] == pytest.approx(sum(map(sum, expected.values())) / 10)
    mce = (sum(expected["brightness"]) / 5 / ALEXNET_ERRORS["brightness"]
           + sum(expected["contrast"]) / 5 / ALEXNET_ERRORS["contrast"]) / 2  # fmt: skip
    assert got["corruption_mce"] == pytest.approx(mce) and got["corruption_n"] == 7
    assert got["corruption_source"] == f"ImageNet-C (official, from {root})"
    sub = imagenet_c_errors(Constant(k, 10), root, classes=classes, corruptions=("brightness",), severities=(1, 5),
                            size=32, samples=4, seed=3)  # fmt: skip
    assert sub["corruption_n"] == 4 and sub["corruption_mce"] is None  # mCE needs all five severities


def test_imagenet_r_restricts_the_logits_to_its_classes(tmp_path, shared_datasets):
    """A model whose argmax is a class absent from the folder still gets the right masked prediction."""
    wnids, samples = imagenette_jpegs(shared_datasets, 40)
    present = sorted({w for _, w in samples})[:3]
    samples = [s for s in samples if s[1] in present]
    root = write_folder(tmp_path / "imagenet-r", samples, ext=".jpg")
    absent = next(i for i, w in enumerate(wnids) if w not in present)
    table = lookup_table(samples, wnids, size=32, crop_pct=0.875)
    model = Lookup(table, 10, decoy=absent)
    kw = dict(classes=wnids, size=32, crop_pct=0.875)
    assert class_folder_error(model, root, restrict=True, **kw) == (0.0, len(samples))
    assert class_folder_error(model, root, restrict=False, **kw) == (1.0, len(samples))  # unmasked: the decoy wins
    # the reference: the ImageNet-R authors' mask over the outputs, labels in the folder's own order
    src = ImageFolderSource(root, transform=val_transform(size=32, crop_pct=0.875))
    mask = torch.tensor([wnids.index(w) for w in src.classes])
    for i in range(len(src)):
        s = src[i]
        out = model(s.image[None].float() / 255)
        assert int(out[:, mask].argmax(1)) == s.label


def test_stylized_imagenet_uses_the_1000_imagenet_indices(tmp_path, shared_datasets):
    wnids, samples = imagenette_jpegs(shared_datasets, 10)
    root = write_folder(tmp_path / "stylized", samples, ext=".png")  # any image extension; bytes are JPEG
    classes = imagenet_classes()
    table = {k: classes.index(wnids[v]) for k, v in lookup_table(samples, wnids, size=32, crop_pct=1.0).items()}
    kw = dict(classes=classes, restrict=False, size=32, crop_pct=1.0)
    assert class_folder_error(Lookup(table, 1000), root, **kw) == (0.0, 10)
    spaniel = classes.index("n02102040")  # ImageNet index 217, imagenette's label 1
    assert spaniel == 217
    err, n = class_folder_error(Constant(spaniel, 1000), root, **kw)
    assert err == pytest.approx(1 - sum(w == "n02102040" for _, w in samples) / 10) and err < 1


def test_shift_eval_labels_the_fallback_and_the_official_release(tmp_path, shared_datasets):
    wnids, samples = imagenette_jpegs(shared_datasets, 6)
    root = tmp_path / "c"
    write_folder(root / "contrast" / "1", samples)
    model = Constant(0, 10)
    images = [val_transform(size=32, crop_pct=1.0)(d) for d, _ in samples]
    labels = [wnids.index(w) for _, w in samples]
    fb = shift_eval(model, classes=None, corruptions=("contrast",), severities=(1,), fallback=lambda: (images, labels))
    assert fb["corruption_source"] == "ImageNet-C (on-the-fly regeneration of 6 images, not the official release)"
    off = shift_eval(model, classes=wnids, corruptions=("contrast",), severities=(1,), imagenet_c=str(root), size=32,
                     imagenet_r=str(root / "contrast" / "1"), stylized=str(root / "contrast" / "1"))  # fmt: skip
    assert off["corruption_source"] == f"ImageNet-C (official, from {root})"
    assert off["imagenet_r_n"] == off["stylized_n"] == 6 and 0 <= off["imagenet_r_error"] <= off["stylized_error"]
    text = shift_table(off, (1,))
    assert f"ImageNet-C (official, from {root}): mean top-1 error" in text and "| contrast |" in text
    assert "ImageNet-R (from" in text and "Stylized-ImageNet (from" in text
    assert "on-the-fly regeneration of 6 images" in shift_table(fb, (1,))
    assert (off["corruption_official"], fb["corruption_official"]) == (True, False)
    fb5 = dict(fb, corruption_errors={"contrast": [0.5] * 5}, corruption_mce=0.5 / ALEXNET_ERRORS["contrast"])
    assert "(AlexNet-normalized, indicative: other images than AlexNet's)" in shift_table(fb5, (1, 2, 3, 4, 5))
    off5 = dict(off, corruption_errors={"contrast": [0.5] * 5}, corruption_mce=0.5 / ALEXNET_ERRORS["contrast"])
    assert "(AlexNet-normalized)" in shift_table(off5, (1, 2, 3, 4, 5))


def test_mce_is_alexnet_normalized_and_undefined_outside_its_protocol():
    assert mean_corruption_error({"fog": [ALEXNET_ERRORS["fog"]] * 5}, (1, 2, 3, 4, 5)) == pytest.approx(1.0)
    assert mean_corruption_error({"spatter": [0.5] * 5}, (1, 2, 3, 4, 5)) is None  # no AlexNet reference
    assert mean_corruption_error({"fog": [0.5] * 4}, (1, 2, 3, 4)) is None


def test_model_classes_from_folders_manifests_and_imagenet(tmp_path, shared_datasets):
    for w in ("n02", "n01", "n03"):
        (tmp_path / "train" / w).mkdir(parents=True)
    assert model_classes(DataConfig(kind="folder", path=str(tmp_path)), num_classes=3) == ["n01", "n02", "n03"]
    wds = DataConfig(kind="wds", path=str(shared_datasets / "imagenette224"))
    assert model_classes(wds, num_classes=10)[:2] == ["n01440764", "n02102040"]
    assert model_classes(DataConfig(kind="digits"), num_classes=10) is None
    assert model_classes(DataConfig(kind="digits"), num_classes=1000) == imagenet_classes()
    with pytest.raises(ValueError, match="lists 10 classes but model.num_classes is 5"):
        model_classes(wds, num_classes=5)


def test_missing_or_malformed_folders_fail_with_one_line_before_any_work(tmp_path, shared_datasets):
    wnids, samples = imagenette_jpegs(shared_datasets, 3)
    root = tmp_path / "c"
    for s in (1, 2):
        write_folder(root / "fog" / str(s), samples)
    kw = dict(classes=wnids, corruptions=("fog",), severities=(1, 2, 3), prefix="eval.")
    others = [w for w in wnids if w != samples[0][1]]
    cases = [
        (dict(kw, imagenet_c=str(tmp_path / "nowhere")), FileNotFoundError, "eval.imagenet_c: .*is not a folder"),
        (dict(kw, imagenet_c=str(root)), ValueError, r"1 <corruption>/<severity> folders missing .*fog/3"),
        (dict(kw, severities=(1,), imagenet_c=str(root), classes=others), ValueError, "not among the model's"),
        (dict(kw, severities=(1,), imagenet_c=str(root), classes=None), ValueError, "eval.imagenet_c need the mod"),
        (dict(kw, corruptions=(), imagenet_r=str(tmp_path)), ValueError, "eval.imagenet_r: .*not among"),
        (dict(kw, corruptions=(), stylized=str(root / "fog" / "9")), FileNotFoundError, "eval.stylized: .*not a fold"),
        (dict(kw, corruptions=("rain",)), ValueError, r"unknown corruptions \['rain'\]"),  # the fallback's names
    ]
    (tmp_path / "empty" / wnids[0]).mkdir(parents=True)
    cases.append((dict(kw, corruptions=(), imagenet_r=str(tmp_path / "empty")), ValueError, "holds no image"))
    for args, error, match in cases:
        with pytest.raises(error, match=match) as e:
            check_shift_sets(**args)
        assert "\n" not in str(e.value)
    check_shift_sets(**dict(kw, severities=(1, 2), imagenet_c=str(root), imagenet_r=str(root / "fog" / "1")))
