"""AdvXL's CLIP-text mode: MixUp/CutMix refused, the two-phase job (captions then labels), DDP, global negatives."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from advtrain.training import teardown_distributed
from recipes.advxl import launch, train
from recipes.advxl.config import override, phases, preset
from tests.gloo import spawn_gloo


def _tiny_two_phase(tmp_path, datasets, *, pre: int = 256, fine: int = 128) -> list[str]:
    """Command-line items that shrink imagenette224_two_phase_tiny to seconds."""
    path = str(datasets / "imagenette224")
    return [
        f"run.out_dir={tmp_path / 'job'}",
        f"data.path={path}",
        f"finetune.data.path={path}",
        f"stages.0.samples={pre}",
        "stages.0.warmup_samples=32",
        f"finetune.stages.0.samples={fine}",
        "finetune.stages.0.warmup_samples=32",
        "data.val_samples=32",
        "finetune.data.val_samples=32",
        "eval.pgd_steps=2",
        "finetune.eval.pgd_steps=2",
    ]


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("item", ["augment.mixup=0.8", "augment.cutmix=1.0"])
def test_mixup_or_cutmix_with_clip_text_is_a_one_line_config_error(item):
    cfg = preset("embedded")  # MixUp and CutMix off
    override(cfg, ['clip_text={"tower": "tiny", "pretrained": null}'])  # fine without them
    with pytest.raises(
        ValueError, match=r"^augment\.mixup: .* with clip_text: MixUp/CutMix would mix the images but not"
    ):
        override(cfg, ['clip_text={"tower": "tiny", "pretrained": null}', item])


def test_the_launcher_reports_mixup_in_clip_mode_on_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        launch.main(["--preset", "imagenette224_two_phase_tiny", "augment.cutmix=1.0", "--dry-run"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "augment.mixup: 0.0 (augment.cutmix 1.0) with clip_text" in err


def test_a_two_phase_job_is_pretraining_on_captions_then_finetuning_on_labels_from_its_checkpoint():
    cfg = preset("imagenette224_two_phase_tiny")
    runs = launch.runs(cfg)
    assert list(runs) == ["pretrain", "finetune"] and runs == phases(cfg)
    pre, ft = runs["pretrain"], runs["finetune"]
    assert pre.run.out_dir.endswith("/pretrain") and ft.run.out_dir.endswith("/finetune")
    assert pre.clip_text is not None and pre.finetune is None and pre.model.num_classes == 32
    assert ft.clip_text is None and ft.finetune is None and ft.model.num_classes == 10
    assert ft.model.name == pre.model.name and ft.model.kwargs == pre.model.kwargs  # the same image tower
    seen = -(-pre.total_samples // pre.data.batch_size) * pre.data.batch_size
    assert ft.model.init == f"{pre.run.out_dir}/checkpoints/ckpt-{seen:012d}.pt"
    assert ft.stages == cfg.finetune.stages and ft.optim == cfg.finetune.optim and ft.data == cfg.finetune.data
    real = launch.runs(preset("imagenette224_two_phase"))
    assert real["pretrain"].clip_text.tower == "ViT-H-14-CLIPA" and real["pretrain"].model.num_classes == 1024
    assert real["pretrain"].stages[0].attack.steps == 1 and real["finetune"].stages[0].attack.steps == 3


@pytest.mark.parametrize(
    "item, match",
    [
        ("run.compare_standard=true", "run.compare_standard: true with finetune"),
        (
            'finetune.stages=[{"name": "a", "samples": 64, "img_size": 64}, '
            '{"name": "b", "samples": 64, "img_size": 32}]',
            "finetune: phase 2 is not a valid config: stages must go from coarse to fine",
        ),
        ("finetune.stages.0.img_size=60", "finetune: phase 2 is not a valid config: stages.0.img_size: 60 is not"),
    ],
)
def test_bad_two_phase_jobs_are_refused_by_key(item, match):
    with pytest.raises(ValueError, match=match):
        override(preset("imagenette224_two_phase_tiny"), [item])


def test_the_dry_run_checks_phase_two_before_phase_one_wrote_its_init(tmp_path, shared_datasets, capsys):
    launch.main(["--preset", "imagenette224_two_phase_tiny", "--dry-run", *_tiny_two_phase(tmp_path, shared_datasets)])
    assert json.loads(capsys.readouterr().out)["finetune"]["num_classes"] == 10
    assert (
        launch.check(override(preset("imagenette224_two_phase_tiny"), _tiny_two_phase(tmp_path, shared_datasets)), 1)
        == []
    )


# ------------------------------------------------------------------------------------------------ runs


@pytest.mark.slow
def test_two_phase_tiny_runs_end_to_end_on_the_shared_captions_then_labels(tmp_path, shared_datasets, capsys):
    launch.main(["--preset", "imagenette224_two_phase_tiny", *_tiny_two_phase(tmp_path, shared_datasets)])
    out = capsys.readouterr().out
    job = tmp_path / "job"
    assert "| pretrain | contrastive vs caption features" in out and "| finetune | supervised on labels" in out
    assert (job / "phases.md").read_text() in out
    pre = torch.load(sorted((job / "pretrain" / "checkpoints").glob("ckpt-*.pt"))[-1], weights_only=True)["model"]
    start = torch.load(job / "finetune" / "checkpoints" / "ckpt-000000000000.pt", weights_only=True)["model"]
    tower = [k for k in start if k.startswith("inner.") and not k.startswith("inner.head")]
    assert len(tower) > 10 and all(torch.equal(start[k], pre[k]) for k in tower)  # phase 2 starts from phase 1
    assert pre["inner.head.weight"].shape == (32, 32) and start["inner.head.weight"].shape == (10, 32)  # fresh head
    assert "logit_scale" in pre and "logit_scale" not in start
    for phase, stage in (("pretrain", "coarse"), ("finetune", "fine")):
        rows = [json.loads(line) for line in (job / phase / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in rows if r["kind"] == "eval"]
        assert [e["stage"] for e in evals] == [stage] and 0 <= evals[0]["clean"] <= 1 and evals[0]["n"] == 32


def test_a_clip_checkpoint_head_is_never_loaded_as_a_class_head(tmp_path):
    """Even when the text width equals the class count, so that the shapes would match."""
    cfg = preset("imagenette224_two_phase_tiny")
    clip = dataclasses.replace(cfg, finetune=None, model=dataclasses.replace(cfg.model, num_classes=10))
    src = train.build_model(clip)
    torch.save({"model": src.state_dict()}, tmp_path / "clip.pt")
    ft = phases(cfg)["finetune"]
    ft = dataclasses.replace(ft, model=dataclasses.replace(ft.model, init=str(tmp_path / "clip.pt")))
    dst, logs = train.build_model(ft), []
    before = dst.inner.head.weight.detach().clone()
    train.load_init_weights(ft, dst, logs.append)
    assert torch.equal(dst.inner.blocks[0].attn.qkv.weight, src.inner.blocks[0].attn.qkv.weight)
    assert torch.equal(dst.inner.head.weight, before) and "missing ['head.bias', 'head.weight']" in logs[0]


def _ddp_clip_worker(rank: int, out_dir: str, data: str):
    import pathlib

    cfg = override(preset("imagenette224_two_phase_tiny"), _tiny_two_phase(pathlib.Path(out_dir), pathlib.Path(data)))
    cfg = phases(cfg)["pretrain"]
    cfg = dataclasses.replace(cfg, stages=(dataclasses.replace(cfg.stages[0], samples=128),))
    out = train.main(cfg)
    torch.save(out["final_weights"], f"{out_dir}/rank{rank}.pt")
    teardown_distributed()


@pytest.mark.slow
def test_two_gloo_ranks_train_clip_mode_with_global_negatives_in_lockstep(tmp_path, shared_datasets):
    spawn_gloo(_ddp_clip_worker, str(tmp_path), str(shared_datasets))
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # one all-reduced update per step on both ranks
    rows = [json.loads(line) for line in (tmp_path / "job" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "eval" for r in rows) and all(
        torch.isfinite(torch.tensor(r["loss"])) for r in rows if r["kind"] == "train"
    )


def test_a_submitted_two_phase_job_gets_absolute_paths_for_both_data_sections(shared_datasets, monkeypatch):
    from recipes.cluster import absolute_paths

    monkeypatch.chdir(shared_datasets.parent)  # ../shared: the presets' relative data paths resolve from a worktree
    rel = "datasets/imagenette224"
    cfg = override(preset("imagenette224_two_phase_tiny"), [f"data.path={rel}", f"finetune.data.path={rel}"])
    out = absolute_paths(cfg)
    assert out.data.path == out.finetune.data.path == str((shared_datasets / "imagenette224").resolve())
    assert phases(out)["finetune"].model.init.startswith(out.run.out_dir)  # phase 2's init follows the absolute dir
