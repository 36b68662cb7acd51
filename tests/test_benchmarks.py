"""The benchmark scripts run end to end on CPU (a smoke run: no timing is asserted; figures live in benchmarks/)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_at_step_cpu_preset_measures_every_row(tmp_path):
    at_step = _load("at_step")
    rows = at_step.main(
        [
            "--preset",
            "cpu",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--models",
            "ResNet-18",
            "--out",
            str(tmp_path / "at_step"),
        ]
    )
    names = [r["row"] for r in rows]
    assert names[:4] == ["clean", "pgd1", "pgd3", "free"]
    assert all(r["img_per_s"] > 0 and r["ms"] > 0 for r in rows)
    assert rows[0]["rel_clean"] == 1.0 and {r["floor"] for r in rows[:3]} == {1.0, 5 / 3, 3.0}
    saved = json.loads((tmp_path / "at_step.json").read_text())
    assert saved["rows"] == rows and saved["meta"]["device"] and saved["meta"]["torch"]
    assert (tmp_path / "at_step.md").read_text().startswith("| model | step |")


def test_floors_follow_the_forward_backward_count():
    at_step = _load("at_step")
    assert at_step.floor_of("pgd1") == pytest.approx(5 / 3) and at_step.floor_of("pgd3") == 3.0
    assert at_step.floor_of("free") == 1.0 and at_step.floor_of("stage1 112px pgd1 (batch 512)") is None


def test_cifar_augment_is_a_reflect_padded_crop_and_a_flip():
    c10 = _load("cifar10_reference")
    import torch
    import torch.nn.functional as F

    x = torch.rand(6, 3, 32, 32)
    g = torch.Generator().manual_seed(3)
    out = c10.augment(x, g)
    g = torch.Generator().manual_seed(3)  # the same draws, in the same order
    dy, dx = torch.randint(0, 9, (6, 1, 1, 1), generator=g), torch.randint(0, 9, (6, 1, 1, 1), generator=g)
    flip = torch.rand(6, generator=g) < 0.5
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    for i in range(6):
        crop = padded[i, :, dy[i, 0, 0, 0] : dy[i, 0, 0, 0] + 32, dx[i, 0, 0, 0] : dx[i, 0, 0, 0] + 32]
        assert torch.equal(out[i], crop.flip(2) if flip[i] else crop)


@pytest.mark.slow
def test_cifar10_reference_smoke_run(shared_datasets, tmp_path):
    c10 = _load("cifar10_reference")
    r = c10.main(
        [
            "--device",
            "cpu",
            "--data",
            str(shared_datasets / "cifar10"),
            "--limit",
            "256",
            "--epochs",
            "1",
            "--batch",
            "64",
            "--width",
            "8",
            "--eval-limit",
            "64",
            "--pgd-steps",
            "2",
            "--out",
            str(tmp_path / "c10"),
        ]
    )
    assert r["train_images"] == 256 and r["test_images"] == 64 and r["train_seconds"] > 0
    assert 0 <= r["pgd"] <= 1 and 0 <= r["clean"] <= 1
    assert json.loads((tmp_path / "c10.json").read_text())["result"] == r


def test_label_leak_second_half_means():
    label_leak = _load("label_leak")
    rows = [
        {"kind": "train", "samples": s, "acc_clean": c, "acc_noisy": 0.5, "acc_adv": a}
        for s, c, a in ((10, 0.0, 0.0), (20, 0.2, 0.1), (30, 0.6, 0.7), (40, 0.8, 0.9))
    ] + [{"kind": "eval"}]
    assert label_leak.second_half_means(rows) == pytest.approx({"clean": 0.7, "noisy": 0.5, "adv": 0.8})
    with pytest.raises(ValueError, match="no training"):
        label_leak.second_half_means([{"kind": "eval"}])


@pytest.mark.slow
def test_label_leak_smoke_run_trains_both_arms(tmp_path, monkeypatch):
    label_leak = _load("label_leak")
    monkeypatch.chdir(tmp_path)
    results = label_leak.main(
        [
            "--set",
            "optim.epochs=1",
            "--set",
            "optim.milestones=[0.5]",
            "--set",
            "eval.corruptions=[]",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert list(results) == ["embedded-shuffle_bn=false", "embedded-shuffle_bn=true"]
    for r in results.values():
        assert set(r["train_top1"]) == {"clean", "noisy", "adv"} and all(0 <= v <= 1 for v in r["train_top1"].values())
        assert 0 <= r["final_eval"]["pgd10"] <= r["final_eval"]["clean"] <= 1
    configs = [json.loads((tmp_path / "runs" / "label_leak" / n / "config.json").read_text()) for n in results]
    assert [c["adv"]["shuffle_bn"] for c in configs] == [False, True] and configs[0]["run"]["seed"] == configs[1][
        "run"
    ]["seed"]
    table = (tmp_path / "out" / "label_leak_embedded.md").read_text()
    assert "| embedded-shuffle_bn=false |" in table and (tmp_path / "out" / "label_leak_embedded.png").exists()


def test_data_throughput_measures_old_and_new_paths(tmp_path, shared_datasets):
    bench = _load("data_throughput")
    out = bench.main(
        [
            "--data",
            str(shared_datasets / "imagenette224"),
            "--images",
            "3",
            "--seconds",
            "0.01",
            "--rounds",
            "1",
            "--sizes",
            "112",
            "--out",
            str(tmp_path / "dt"),
        ]
    )
    paths = {r["path"] for r in out["rows"]}
    assert any(p.startswith("old") for p in paths) and "new (pillow)" in paths
    assert {r["images"] for r in out["rows"]} == {"imagenette224 (224x224, q75)", "synthetic 500x375 q90"}
    assert all(r["full_aug_img_s"] > 0 and r["cores_for_7000"] == 7000 / r["full_aug_img_s"] for r in out["rows"])
    assert out["loader_rows"] and out["meta"]["cpu"] and out["meta"]["pillow"]
    assert "| images | px | path |" in (tmp_path / "dt.md").read_text()
