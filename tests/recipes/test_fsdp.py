"""run.parallel=fsdp in the recipes: FSDP = DDP = one process, DCP resume, consolidation, input-only attacks.

Two gloo processes on CPU, the 1-block ViT of ``tests/recipes/test_advxl.tiny`` (6 steps, 2 stages, PGD-1 then
PGD-2, an EMA evaluated at each stage's end; the FSDP runs with activation checkpointing) with the attacks' random
start off, so that one process with the whole batch computes what two ranks with half of it each do (a random
start is drawn per rank).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from advtrain.training import teardown_distributed
from recipes.advxl import train
from tests.gloo import spawn_gloo
from tests.recipes.test_advxl import losses, tiny

ROOT = pathlib.Path(__file__).resolve().parents[2]
REL = 1e-5  # FSDP and DDP, 2 ranks, vs one process: float summation order only (measured: 1.5e-7 rel at most)


def cfg_of(out: pathlib.Path, parallel: str):
    """The FSDP runs also checkpoint every block (recomputation changes no value); every run keeps an EMA."""
    cfg = tiny(out, parallel=parallel, activation_checkpointing=parallel == "fsdp")
    stages = tuple(dataclasses.replace(s, attack=dataclasses.replace(s.attack, random_start=False)) for s in cfg.stages)
    return dataclasses.replace(cfg, stages=stages, optim=dataclasses.replace(cfg.optim, ema_decay=0.9))


def _fsdp_worker(rank: int, root: str):
    root = pathlib.Path(root)
    out = train.main(cfg_of(root / "a", "fsdp"))  # straight through
    torch.save(out["final_weights"], root / f"a-rank{rank}.pt")
    cfg_b = cfg_of(root / "b", "fsdp")
    assert not train.main(cfg_b, stop_after_samples=64)["finished"]  # "preempted" after the 64-sample checkpoint
    if rank == 0:
        shutil.copytree(root / "b", root / "c")  # the same checkpoint, for a resume on one process
    torch.distributed.barrier()
    out = train.main(cfg_b)  # resumed on 2 processes
    torch.save(out["final_weights"], root / f"b-rank{rank}.pt")
    teardown_distributed()


def _ddp_worker(rank: int, root: str):
    train.main(cfg_of(pathlib.Path(root) / "ddp", "ddp"))
    teardown_distributed()


def _one_process_resume(rank: int, root: str):
    """FSDP on a world of one (an in-memory process group) resumes the 2-process checkpoint."""
    from advtrain.parallel import ParallelModel, consolidate, resume_run
    from advtrain.training import RunDir, setup_distributed

    root = pathlib.Path(root)
    cfg = cfg_of(root / "c", "fsdp")
    ckpt = root / "c" / "run" / "checkpoints" / "ckpt-000000000064"
    saved = consolidate(ckpt, root / "c-64.pt", strip_prefix="")
    dd = setup_distributed(device="cpu")
    raw = train.build_model(cfg)
    pm = ParallelModel(raw, dd, parallel="fsdp", precision="fp32", activation_checkpointing=False)
    opt = torch.optim.AdamW(train.param_groups(raw, cfg.optim.weight_decay), lr=cfg.optim.lr)
    msgs = []
    state = resume_run(
        RunDir(cfg.run.out_dir, dd=dd, log=msgs.append), {"model": raw, "optim": opt}, dd, pm=pm, log=msgs.append
    )
    loaded = pm.full_state_dict()
    diff = max((loaded[k] - saved[k]).abs().max().item() for k in saved)
    steps = {float(s["step"]) for s in opt.state.values()}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        out = train.main(cfg)
    json.dump(
        {
            "samples": state["samples_seen"],
            "diff": diff,
            "steps": sorted(steps),
            "log": buf.getvalue(),
            "finished": out["finished"],
            "losses": losses(root / "c" / "run"),
        },
        open(root / "c.json", "w"),
    )
    teardown_distributed()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    spawn_gloo(_fsdp_worker, str(root))
    spawn_gloo(_ddp_worker, str(root))
    single = train.main(cfg_of(root / "one", "ddp"))
    return root, single


@pytest.mark.slow
def test_fsdp_loss_equals_ddp_and_one_process(runs):
    root, _ = runs
    fsdp, ddp, one = (losses(root / d / "run") for d in ("a", "ddp", "one"))
    assert len(fsdp) == len(ddp) == len(one) == 6
    assert fsdp == pytest.approx(ddp, rel=REL) and fsdp == pytest.approx(one, rel=REL)
    w0, w1 = torch.load(root / "a-rank0.pt"), torch.load(root / "a-rank1.pt")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # every rank gathers the same full weights


@pytest.mark.slow
def test_dcp_checkpoint_resumes_bit_identically_on_two_processes(runs):
    root, _ = runs
    ckpts = sorted(p.name for p in (root / "a" / "run" / "checkpoints").iterdir())
    assert ckpts == ["ckpt-000000000128", "ckpt-000000000192"]  # DCP directories, the newest 2 kept
    assert {"COMPLETE.json", "rank-00000.pt", "rank-00001.pt", "extra.pt", ".metadata"} <= {
        p.name for p in (root / "a" / "run" / "checkpoints" / ckpts[-1]).iterdir()
    }
    a, b = torch.load(root / "a-rank0.pt"), torch.load(root / "b-rank0.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(root / "a" / "run") == losses(root / "b" / "run")  # the metrics file cut back and re-logged


@pytest.mark.slow
def test_dcp_checkpoint_resumes_on_one_process_with_the_per_rank_state_reset(runs):
    root, _ = runs
    spawn_gloo(_one_process_resume, str(root), world=1)
    r = json.loads((root / "c.json").read_text())
    assert r["samples"] == 64 and r["diff"] == 0.0  # resharded 2 -> 1: the weights exactly as saved
    assert r["steps"] == [2.0]  # AdamW's step count as saved (2 steps of 32 images)
    assert "written by 2 process(es) and this run has 1" in r["log"] and "cannot be restored" in r["log"]
    assert r["finished"] and len(r["losses"]) == 6
    assert r["losses"][:2] == losses(root / "a" / "run")[:2]  # the 2 steps before the checkpoint, kept
    # after it the loader restarts its stream (positions of 2 ranks do not map onto 1): other batches, same scale
    assert all(abs(x - y) < 0.5 for x, y in zip(r["losses"][2:], losses(root / "a" / "run")[2:]))


@pytest.mark.slow
def test_consolidated_checkpoint_loads_into_timm_and_advtrain_eval(runs, shared_datasets, tmp_path):
    from advtrain.eval._cli import main as eval_main
    from tests.eval.conftest import copy_shard_samples

    root, _ = runs
    cfg = cfg_of(root / "a", "fsdp")
    kwargs = dict(cfg.model.kwargs) | {"num_classes": 10}
    out = tmp_path / "vit.pt"
    cmd = [
        sys.executable,
        "-m",
        "advtrain.parallel.consolidate",
        str(root / "a/run/checkpoints/ckpt-000000000192"),
        str(out),
        "--timm-model",
        cfg.model.name,
        "--timm-kwargs",
        json.dumps(kwargs),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)}, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "loads it with strict=True" in p.stdout
    sd, final = torch.load(out, weights_only=True), torch.load(root / "a-rank0.pt")
    assert sd.keys() == {k.removeprefix("inner.") for k in final}
    assert all(torch.equal(sd[k.removeprefix("inner.")], v) for k, v in final.items())
    p = subprocess.run(
        cmd[:4] + [str(tmp_path / "ema.pt"), "--key", "ema"],
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    ema = torch.load(tmp_path / "ema.pt", weights_only=True)
    assert p.returncode == 0 and ema.keys() == sd.keys() and not all(torch.equal(ema[k], sd[k]) for k in sd)
    shards = copy_shard_samples(shared_datasets / "imagenette224", tmp_path / "val", n=8, per_shard=8)
    argv = [
        "--model",
        cfg.model.name,
        "--model-kwargs",
        json.dumps(cfg.model.kwargs),
        "--num-classes",
        "10",
        "--checkpoint",
        str(out),
        "--data",
        str(shards),
        "--img-size",
        "32",
        "--crop-pct",
        "1",
        "--n",
        "8",
        "--pgd-steps",
        "1",
        "--norms",
        "linf",
        "--out",
        str(tmp_path / "eval"),
        "--workers",
        "1",
        "--no-progress",
    ]
    assert eval_main(argv) == 0
    assert (tmp_path / "eval" / "report.json").exists()


# ------------------------------------------------------------------------------------------------ the attack


def _attack_worker(rank: int, root: str):
    from advtrain import pgd
    from advtrain.parallel import ParallelModel
    from advtrain.training import setup_distributed

    dd = setup_distributed(device="cpu")
    cfg = tiny(pathlib.Path(root))
    torch.manual_seed(0)
    raw = train.build_model(cfg)
    plain = train.build_model(cfg)
    plain.load_state_dict(raw.state_dict())
    pm = ParallelModel(raw, dd, parallel="fsdp", precision="fp32", activation_checkpointing=True)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    kw = dict(eps=0.1, step_size=0.05, steps=2, norm="linf", random_start=True)
    raw.eval()
    adv = pgd(pm.raw, x, y, generator=torch.Generator().manual_seed(1), **kw)
    ref = pgd(plain.eval(), x, y, generator=torch.Generator().manual_seed(1), **kw)
    grads = [n for n, p in raw.named_parameters() if p.grad is not None]
    torch.save({"grads": grads, "diff": (adv - ref).abs().max().item()}, f"{root}/attack{rank}.pt")
    teardown_distributed()


@pytest.mark.slow  # two spawned processes: ~15 s on the shared 2-core machine, mostly imports
def test_attacks_through_the_sharded_model_take_the_input_gradient_only(tmp_path):
    spawn_gloo(_attack_worker, str(tmp_path))
    for rank in (0, 1):
        r = torch.load(tmp_path / f"attack{rank}.pt")
        assert r["grads"] == []  # no weight gradient: nothing for FSDP to reduce-scatter
        assert r["diff"] <= 1e-6  # the unsharded model's adversarial images (float summation order aside)


# ------------------------------------------------------------------------------------------------ config


def test_run_parallel_is_validated_and_refused_where_unsupported():
    from advtrain.training import ConfigError, RunConfig, override
    from recipes.advxl.config import preset

    with pytest.raises(ValueError, match="parallel: 'zero3' is not 'ddp' or 'fsdp'"):
        RunConfig(parallel="zero3")
    with pytest.raises(ConfigError, match="run.parallel"):
        override(preset("embedded"), ["run.parallel=zero3"])
    cfg = override(preset("embedded"), ["run.parallel=fsdp", "run.compile=true"])
    with pytest.raises(ValueError, match="run.compile=true needs run.parallel=ddp"):
        train.validate(cfg)
    clip = override(preset("embedded"), ["run.parallel=fsdp", 'clip_text={"tower": "tiny", "pretrained": null}'])
    with pytest.raises(ValueError, match="CLIP-text mode needs run.parallel=ddp"):
        train.validate(clip)
    from recipes.fast_advprop import launch as fap

    with pytest.raises(SystemExit, match="split BatchNorm and gradient recycling need run.parallel=ddp"):
        fap.main(["--dry-run", "run.parallel=fsdp"])


def test_dry_run_prints_the_memory_estimate_for_the_world_and_mode(capsys):
    from recipes.advxl import launch

    launch.main(
        [
            "--preset",
            "imagenet_vit_l16",
            "--dry-run",
            "--world",
            "64",
            "run.parallel=fsdp",
            "run.activation_checkpointing=true",
        ]
    )
    cap = capsys.readouterr()
    assert json.loads(cap.out)["run"]["parallel"] == "fsdp"  # stdout stays the resolved config
    lines = [x for x in cap.err.splitlines() if x.startswith("memory per GPU:")]
    assert len(lines) == 2  # one per stage size
    assert (
        "vit_large_patch16_224 112px (50 tokens) x 64/GPU, 64 GPUs, fsdp + activation checkpointing, bf16" in (lines[0])
    )
    assert "224px (197 tokens)" in lines[1] and "not measured on a GPU" in lines[1]
    assert all("EMA 0.02, " in x for x in lines)  # the preset's EMA (0.9999): 4 bytes x 304M parameters / 64


@pytest.mark.slow
def test_activation_checkpointing_under_ddp_keeps_the_pinned_losses(tmp_path):
    from tests.recipes.test_advxl import PINNED

    train.main(tiny(tmp_path, activation_checkpointing=True))  # one process: checkpoint_blocks_, no wrapper
    assert losses(tmp_path / "run") == pytest.approx(PINNED, rel=1e-4, abs=1e-5)  # recomputation changes nothing
