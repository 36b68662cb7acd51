"""The command's AutoAttack equals pyautoattack's standard evaluation, sample by sample, for l_inf, l_2 and l_1.

A tiny CNN is trained on MNIST for a few seconds; 32 MNIST test images are packed as WebDataset shards; the
command (``python -m advtrain.eval``, in-process) evaluates them with AutoAttack ``standard``; the reference is
``pyautoattack.AutoAttack(model, norm, eps, version="standard", seed=0).run_standard_evaluation(x, y)`` on the
same pixels (checked equal to what the command's data pipeline produces) with the batch the command used.
Slow: standard AutoAttack runs FAB-T (9 targets x 100 steps) and Square (5,000 queries) on every survivor, on
CPU, twice per norm.
"""

from __future__ import annotations

import importlib.metadata
import json

import pytest
import torch

from advtrain.data import load_image_set
from advtrain.eval import read_sample_log
from advtrain.eval._cli import main
from advtrain.eval._evaldata import eval_transform, index_data
from tests.eval.conftest import copy_shard_samples
from tests.eval.models import MnistTiny, train_mnist_tiny

N = 32
# radii where roughly a fifth to a half of the images survive: every attack of the standard version then runs
EPS = {"linf": ("0.08", 0.08), "l2": ("1", 1.0), "l1": ("8", 8.0)}


@pytest.fixture(scope="module")
def mnist_setup(shared_datasets, tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist-aa")
    train = load_image_set(shared_datasets / "mnist", "train", limit=6000)
    model = train_mnist_tiny(train.images, train.labels, epochs=3)
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, root / "ckpt.pt")
    shards = copy_shard_samples(shared_datasets / "mnist", root / "shards", n=N, split="test")
    # the same images: the command's pipeline (full decode to RGB, size 28, crop_pct 1) vs the raw pixels
    index = index_data(str(shards), split="test")
    t = eval_transform(size=28, crop_pct=1.0, interpolation="bicubic")
    ours = torch.stack([t(_bytes(shards, s.key)) for s in index.samples]).float().div(255)
    raw = load_image_set(shards, "test")
    x = raw.images.float().div(255).expand(-1, 3, -1, -1).contiguous()
    assert torch.equal(ours, x)
    return model, root, x, raw.labels, [s.key for s in index.samples]


def _bytes(shards, key):
    import tarfile

    for p in sorted(shards.glob("*.tar")):
        with tarfile.open(p) as tf:
            for m in tf:
                if m.name == f"{key}.png":
                    return tf.extractfile(m).read()
    raise KeyError(key)


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_command_autoattack_equals_pyautoattack_standard(mnist_setup, norm, capsys):
    from pyautoattack import AutoAttack

    model, root, x, y, keys = mnist_setup
    text, eps = EPS[norm]
    out = root / f"out-{norm}"
    rc = main(
        [
            "--model",
            "tests.eval.models:mnist_tiny",
            "--checkpoint",
            str(root / "ckpt.pt"),
            "--data",
            str(root / "shards"),
            "--split",
            "test",
            "--img-size",
            "28",
            "--crop-pct",
            "1",
            "--eps",
            f"{norm}={text}",
            "--pgd-steps",
            "0",
            "--autoattack",
            "standard",
            "--seed",
            "0",
            "--subset",
            "all",
            "--batch-size",
            str(N),
            "--workers",
            "1",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    recs = read_sample_log(out.glob("samples.*.jsonl"))
    name = f"autoattack-{norm}-{text}"
    ours = [recs[k][name] for k in keys]

    ref_model = MnistTiny()
    ref_model.load_state_dict(model.state_dict())
    ref_model.eval()
    aa = AutoAttack(
        ref_model,
        norm={"linf": "Linf", "l2": "L2", "l1": "L1"}[norm],
        eps=eps,
        version="standard",
        seed=0,
        device="cpu",
    )
    x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=N)
    with torch.no_grad():
        clean = ref_model(x).argmax(1) == y
        robust = (ref_model(x_adv).argmax(1) == y) & clean
    assert [recs[k]["clean"] for k in keys] == clean.tolist()
    assert ours == robust.tolist()  # exactly, sample by sample
    report = json.loads((out / "report.json").read_text())
    assert report["attack_versions"]["pyautoattack"] == importlib.metadata.version("pyautoattack")
    assert report["results"]["counts"][name] == int(robust.sum())
    print(
        f"\n{norm} eps {text}: clean {int(clean.sum())}/{N}, command AutoAttack {sum(ours)}/{N}, "
        f"pyautoattack {int(robust.sum())}/{N}"
    )
    assert 0 < int(robust.sum()) < int(clean.sum())  # the attacks bite and some images survive: not vacuous
