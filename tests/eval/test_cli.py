"""``python -m advtrain.eval`` end to end on CPU: real imagenette shards and class folders, tiny models."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import advtrain.eval._protocol as protocol_module
from advtrain.eval import read_sample_log, stratified_subset, subset_digest
from advtrain.eval._cli import main
from advtrain.eval._evaldata import index_data
from advtrain.eval._evalmodel import state_dict_sha256
from tests.eval.conftest import class_folder_from_shards, copy_shard_samples

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--model",
    "tests.eval.models:tiny_net",
    "--random-init",
    "--img-size",
    "16",
    "--crop-pct",
    "1",
    "--workers",
    "1",
    "--no-progress",
]


@pytest.fixture(scope="module")
def shards(shared_datasets, tmp_path_factory) -> Path:
    return copy_shard_samples(
        shared_datasets / "imagenette224", tmp_path_factory.mktemp("wds") / "val", n=40, per_shard=20
    )


def _records(out: Path) -> dict:
    return read_sample_log(sorted(out.glob("samples.*.jsonl")))


# ------------------------------------------------------------------------------------------------ timm, end to end


@pytest.fixture(scope="module")
def timm_run(shards, tmp_path_factory):
    """resnet10t from a recipe-style checkpoint; PGD-2 and AutoAttack (APGD-CE) at l_inf 2/255, 4/255, l_2 2, l_1 75."""
    import timm

    tmp = tmp_path_factory.mktemp("timm")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        src = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    ckpt = tmp / "ckpt-00000100.pt"
    torch.save({"model": {f"inner.{k}": v for k, v in src.state_dict().items()}, "optim": {}, "step": 100}, ckpt)
    out = tmp / "out"
    argv = [
        "--model",
        "resnet10t",
        "--checkpoint",
        str(ckpt),
        "--data",
        str(shards),
        "--img-size",
        "32",
        "--eps",
        "linf=2/255,4/255",
        "l2=2",
        "l1=75",
        "--pgd-steps",
        "2",
        "--autoattack",
        "apgd-ce",
        "--n",
        "20",
        "--batch-size",
        "10",
        "--plot",
        "linf",
        "--out",
        str(out),
        "--workers",
        "2",
        "--no-progress",
    ]
    return argv, out, ckpt, src


@pytest.mark.slow
def test_end_to_end_timm_checkpoint_on_shards(timm_run, capsys):
    argv, out, ckpt, src = timm_run
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| attack | norm | eps | accuracy (%) | 95% CI | correct / n |")
    for row in (
        "| clean | - | - |",
        "| PGD-2 | linf | 2/255 |",
        "| AutoAttack (apgd-ce) | linf | 4/255 |",
        "| PGD-2 | l2 | 2 |",
        "| AutoAttack (apgd-ce) | l1 | 75 |",
    ):
        assert row in printed
    assert (out / "report.md").read_text().count("| AutoAttack (apgd-ce) |") == 4
    assert (out / "robust_vs_eps_linf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recs = _records(out)
    assert len(recs) == 20
    for r in recs.values():  # robust implies clean, for every attack
        assert all(not r[k] or r["clean"] for k in r if k.startswith(("pgd", "autoattack")))

    rep = json.loads((out / "report.json").read_text())
    # the model and its weights
    assert rep["model"]["name"] == "resnet10t" and rep["model"]["num_classes"] == 10
    assert rep["model"]["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert rep["model"]["weights_sha256"] == state_dict_sha256(src)
    assert rep["model"]["load"]["prefixes_stripped"] == ["inner."] and rep["model"]["load"]["container"] == ["model"]
    # the data and its preprocessing: timm's config, the size overridden
    pre = rep["data"]["preprocess"]
    assert pre["size"] == 32 and pre["crop_pct"] == 0.95 and pre["interpolation"] == "bicubic"  # resnet10t test cfg
    assert pre["mean"] == [0.485, 0.456, 0.406] and pre["resize_shorter_to"] == 33
    assert rep["data"]["kind"] == "shards" and rep["data"]["samples"] == 40 and rep["data"]["classes"] == 10
    # the subset: stratified, seeded, named by its digest
    index = index_data(str(argv[argv.index("--data") + 1]))
    idx = stratified_subset([s.key for s in index.samples], [s.label for s in index.samples], n=20, seed=0)
    keys = [index.samples[i].key for i in idx]
    assert rep["subset"]["kind"] == "stratified" and rep["subset"]["n"] == 20
    assert rep["subset"]["sha256"] == subset_digest(keys) and sorted(recs) == sorted(keys)
    # the protocol, attack and library versions
    assert rep["protocol"]["eps"] == {"linf": [2 / 255, 4 / 255], "l2": [2.0], "l1": [75.0]}
    assert rep["protocol"]["dtype"] == "float32" and rep["protocol"]["autocast"] is False
    assert rep["protocol"]["batch_size"] == 10 and rep["protocol"]["seed"] == 0
    assert rep["attack_versions"]["pyautoattack"] == importlib.metadata.version("pyautoattack")
    assert rep["versions"]["torch"] == importlib.metadata.version("torch")
    assert rep["versions"]["timm"] == importlib.metadata.version("timm")
    # the results are the per-sample records' counts
    for name, count in rep["results"]["counts"].items():
        assert count == sum(r[name] for r in recs.values()), name
    assert rep["results"]["n"] == 20 and rep["command"][:3] == ["python", "-m", "advtrain.eval"]


# ------------------------------------------------------------------------------------------------ resume


def test_resume_redoes_only_what_is_missing(shards, tmp_path, capsys):
    args = [
        *TINY,
        "--data",
        str(shards),
        "--eps",
        "linf=4/255",
        "--pgd-steps",
        "2",
        "--autoattack",
        "none",
        "--n",
        "12",
        "--batch-size",
        "4",
    ]
    out = tmp_path / "out"
    assert main([*args, "--out", str(out)]) == 0
    first = _records(out)
    path = out / "samples.0.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])  # killed while writing the sixth record
    assert main([*args, "--out", str(out)]) == 2
    assert "already holds an evaluation: pass --resume" in capsys.readouterr().err
    assert main([*args, "--out", str(out), "--resume"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["results"]["n"] == 12 and rep["results"]["resumed"] == 5
    again = _records(out)
    assert sorted(again) == sorted(first)
    kept = [json.loads(line)["key"] for line in lines[:5]]
    assert all(again[k] == first[k] for k in kept)  # untouched
    assert all(again[k]["clean"] == first[k]["clean"] for k in first)  # clean is per sample: identical
    assert rep["results"]["counts"]["clean"] == sum(r["clean"] for r in first.values())
    # another protocol in the same folder is refused
    assert main([*args, "--out", str(out), "--resume", "--eps", "linf=8/255"]) == 2
    assert "cannot resume" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ data kinds


def test_class_folder_with_imagenet_labels(shared_datasets, tmp_path, capsys):
    folder = class_folder_from_shards(shared_datasets / "imagenette224", tmp_path / "val", n=12)
    args = [
        *TINY,
        "--model-kwargs",
        '{"classes": 1000}',
        "--data",
        str(folder),
        "--pgd-steps",
        "0",
        "--autoattack",
        "none",
        "--norms",
        "linf",
        "--subset",
        "all",
    ]
    classes = len([d for d in folder.iterdir() if d.is_dir()])  # the class folders the first 12 images fill
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    assert (
        f"the model has 1000 outputs but the data has {classes} classes (try --imagenet-labels"
        in capsys.readouterr().err
    )
    assert main([*args, "--imagenet-labels", "--out", str(tmp_path / "b")]) == 0
    recs = _records(tmp_path / "b")
    from timm.data import ImageNetInfo

    wnids = ImageNetInfo().label_names()
    assert len(recs) == 12
    for key, r in recs.items():
        assert wnids[r["label"]] == key.split("/")[0]  # n01440764/val_000007.jpg -> 0, ...


def test_open_clip_zero_shot(shards, tmp_path):
    cfg = tmp_path / "tiny-clip-test.json"
    cfg.write_text(
        json.dumps(
            {
                "embed_dim": 16,
                "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
                "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
            }
        )
    )
    out = tmp_path / "out"
    assert (
        main(
            [
                "--model",
                f"open_clip:{cfg}",
                "--random-init",
                "--data",
                str(shards),
                "--templates",
                "simple",
                "--eps",
                "linf=4/255",
                "--pgd-steps",
                "1",
                "--autoattack",
                "none",
                "--n",
                "10",
                "--out",
                str(out),
                "--no-progress",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    rep = json.loads((out / "report.json").read_text())
    assert rep["model"]["kind"] == "open_clip" and rep["model"]["num_classes"] == 10
    assert rep["model"]["class_names"][:2] == ["tench", "English Springer Spaniel"]  # CLIP's names of the wnids
    assert len(rep["model"]["templates"]) == 7
    assert rep["data"]["preprocess"]["size"] == 32 and rep["data"]["preprocess"]["crop_pct"] == 1.0
    assert rep["results"]["n"] == 10


# ------------------------------------------------------------------------------------------------ bad input


@pytest.fixture
def attacks_forbidden(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("an attack ran")

    monkeypatch.setattr(protocol_module, "pgd", boom)
    monkeypatch.setattr(protocol_module, "autoattack", boom)


def _bad_checkpoint(tmp_path):
    import timm

    path = tmp_path / "five.pt"
    torch.save({"state_dict": timm.create_model("resnet10t", num_classes=5).state_dict()}, path)
    return ["--model", "resnet10t", "--checkpoint", str(path), "--img-size", "32"]


BAD = {
    "checkpoint keys": (
        lambda t: _bad_checkpoint(t),
        r"does not match ResNet: .*fc\.weight: checkpoint \(5, 512\) vs model \(10, 512\)",
    ),
    "class count": (
        lambda t: [*TINY, "--model-kwargs", '{"classes": 7}'],
        "the model has 7 outputs but the data has 10 classes",
    ),
    "linf eps units": (lambda t: [*TINY, "--eps", "linf=4"], "did you mean 4/255"),
    "l2 eps too large": (lambda t: [*TINY, "--eps", "l2=100"], r"eps 100 for l2 is above 13.8564 on \(3, 16, 16\)"),
    "missing subset list": (lambda t: [*TINY, "--subset", str(t / "none.txt")], "no such subset list"),
    "subset keys not in data": (lambda t: [*TINY, "--subset", str(_keys_file(t))], "1 of the 2 keys in"),
    "robustbench list not in data": (
        lambda t: [*TINY, "--subset", "robustbench"],
        "5000 of the 5000 RobustBench ImageNet images are not in the data",
    ),
    "no weights": (lambda t: ["--model", "tests.eval.models:tiny_net"], "exactly one of --pretrained"),
    "bad attack name": (lambda t: [*TINY, "--autoattack", "apgd-ce,pgd"], "custom AutoAttack list"),
}


def _keys_file(tmp_path):
    (tmp_path / "keys.txt").write_text("# two keys\nval_000000\nnot_a_key\n")
    return tmp_path / "keys.txt"


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line_before_any_attack(case, shards, tmp_path, capsys, attacks_forbidden):
    make, pattern = BAD[case]
    args = make(tmp_path)
    if "--data" not in args:
        args = [*args, "--data", str(shards)]
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    import re

    assert re.search(pattern, err[0]), err[0]


def test_missing_data_and_no_traceback_in_a_subprocess(tmp_path):
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "advtrain.eval",
            *TINY,
            "--data",
            str(tmp_path / "nowhere"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: data {str(tmp_path / 'nowhere')!r} does not exist"
    h = subprocess.run(
        [sys.executable, "-m", "advtrain.eval", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert h.returncode == 0 and "--resume" in h.stdout and "RobustBench" in h.stdout


# ------------------------------------------------------------------------------------------------ two ranks


def _rank_worker(rank: int, argv: list[str], port: int, world: int) -> None:
    os.environ.update(
        {
            "WORLD_SIZE": str(world),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    if main(argv) != 0:
        raise SystemExit(f"rank {rank} failed")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_split_the_subset_and_gather_the_counts(shards, tmp_path):
    import torch.multiprocessing as mp

    args = [
        *TINY,
        "--data",
        str(shards),
        "--eps",
        "linf=4/255",
        "--pgd-steps",
        "2",
        "--autoattack",
        "none",
        "--n",
        "14",
        "--batch-size",
        "1",
    ]  # batch 1: every sample's result is independent of the split
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    mp.spawn(_rank_worker, args=([*args, "--out", str(tmp_path / "two")], _free_port(), 2), nprocs=2, join=True)
    r0 = read_sample_log([tmp_path / "two" / "samples.0.jsonl"])
    r1 = read_sample_log([tmp_path / "two" / "samples.1.jsonl"])
    assert len(r0) == len(r1) == 7 and not set(r0) & set(r1)
    one = _records(tmp_path / "one")
    assert (r0 | r1) == one  # the same per-sample results as one process
    rep1 = json.loads((tmp_path / "one" / "report.json").read_text())
    rep2 = json.loads((tmp_path / "two" / "report.json").read_text())
    assert rep2["distributed"]["world_size"] == 2 and rep2["results"]["n"] == 14
    assert rep2["results"]["counts"] == rep1["results"]["counts"]  # gathered from both ranks
    assert rep2["subset"]["sha256"] == rep1["subset"]["sha256"]
