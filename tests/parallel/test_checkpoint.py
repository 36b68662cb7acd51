"""Sharded checkpoints in one process (no process group): layout, atomicity, verification, fallback, export.

The 2-process save / resume / reshard runs are in test_distributed.py; the same code path runs here with
``no_dist``, so these are fast.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from advtrain.parallel import (
    consolidate,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from tests.parallel import _jobs


def _trained(seed=0, steps=2):
    model = _jobs.make_model(seed)
    opt = _jobs.make_optimizer(model)
    _jobs.train(model, opt, steps=range(steps))
    return model, opt


def _save(path, model, opt=None, **kw):
    return save_checkpoint(path, model=model, optimizer=opt, **kw)


def test_roundtrip_restores_model_optimizer_ema_and_states(tmp_path):
    model, opt = _trained()
    ema = _jobs.make_model(seed=3)
    p = _save(
        tmp_path / "ckpt-000000000002", model, opt, ema=ema, extra={"step": 2, "evals": "[]"}, rank_state={"pos": 16}
    )
    assert sorted(q.name for q in p.iterdir()) == [
        ".metadata",
        "COMPLETE.json",
        "__0_0.distcp",
        "extra.pt",
        "rank-00000.pt",
    ]
    assert not any(q.name.startswith(".ckpt") for q in tmp_path.iterdir())  # the temp dir was renamed
    fresh, fresh_opt, fresh_ema = _jobs.make_model(seed=8), None, _jobs.make_model(seed=9)
    fresh_opt = _jobs.make_optimizer(fresh)
    r = load_checkpoint(p, model=fresh, optimizer=fresh_opt, ema=fresh_ema)
    assert r.extra == {"step": 2, "evals": "[]"} and r.rank_state == {"pos": 16} and r.saved_world == 1
    for a, b in ((fresh, model), (fresh_ema, ema)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert json.dumps(fresh_opt.state_dict(), default=str) == json.dumps(opt.state_dict(), default=str)
    # and the two continue identically
    assert _jobs.train(fresh, fresh_opt, steps=range(2, 4)) == _jobs.train(model, opt, steps=range(2, 4))


def test_a_crashed_save_leaves_the_previous_checkpoint_and_is_cleaned_up(tmp_path):
    model, opt = _trained()
    old = _save(tmp_path / "ckpt-000000000001", model, opt, extra={"step": 1})
    stale = tmp_path / ".ckpt-000000000002.tmp"  # what a save killed before its rename leaves
    shutil.copytree(old, stale)
    (stale / "COMPLETE.json").unlink()
    assert latest_checkpoint(tmp_path) == old
    new = _save(tmp_path / "ckpt-000000000002", model, opt, extra={"step": 2})
    assert not stale.exists() and latest_checkpoint(tmp_path) == new


def test_replacing_a_checkpoint_of_the_same_name(tmp_path):
    a, _ = _trained(seed=0)
    b, _ = _trained(seed=1)
    p = _save(tmp_path / "ckpt-1", a)
    _save(tmp_path / "ckpt-1", b)
    fresh = _jobs.make_model(seed=5)
    load_checkpoint(p, model=fresh)
    assert torch.equal(fresh.inner.head.weight, b.inner.head.weight)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["ckpt-1"]


def test_corruption_is_detected_and_the_previous_checkpoint_is_used(tmp_path):
    model, opt = _trained()
    good = _save(tmp_path / "ckpt-000000000001", model, opt)
    bad = _save(tmp_path / "ckpt-000000000002", model, opt)
    verify_checkpoint(bad, hashes=True)
    shard = bad / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    shard.write_bytes(bytes(data))
    verify_checkpoint(bad)  # sizes and metadata still match...
    with pytest.raises(ValueError, match="__0_0.distcp does not match its sha256"):
        verify_checkpoint(bad, hashes=True)  # ...the full check finds it
    shard.write_bytes(bytes(data[:-10]))  # truncated
    logged = []
    assert latest_checkpoint(tmp_path, log=logged.append) == good
    assert "__0_0.distcp has" in logged[0] and "the manifest says" in logged[0]
    (good / ".metadata").write_bytes(b"x" + (good / ".metadata").read_bytes()[1:])
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(good, model=_jobs.make_model())


def test_load_asks_only_for_what_the_checkpoint_holds(tmp_path):
    model, _ = _trained()
    p = _save(tmp_path / "ckpt-1", model)  # no optimizer, no ema
    fresh = _jobs.make_model()
    with pytest.raises(ValueError, match=r"has no \['optim'\]"):
        load_checkpoint(p, model=fresh, optimizer=_jobs.make_optimizer(fresh))
    with pytest.raises(ValueError, match="COMPLETE.json is missing"):
        load_checkpoint(tmp_path, model=model)


def test_prune_keeps_the_newest(tmp_path):
    model, _ = _trained(steps=0)
    for step in (1, 2, 3):
        _save(tmp_path / f"ckpt-{step:012d}", model)
    (tmp_path / "ckpt-000000000009").mkdir()  # incomplete (a save under way): never counted, never deleted
    gone = prune_checkpoints(tmp_path, keep=2)
    assert [g.name for g in gone] == ["ckpt-000000000001"]
    assert sorted(q.name for q in tmp_path.iterdir()) == ["ckpt-000000000002", "ckpt-000000000003", "ckpt-000000000009"]
    with pytest.raises(ValueError, match="keep must be an int >= 1"):
        prune_checkpoints(tmp_path, keep=0)


def test_consolidate_strips_the_wrapper_and_drops_its_tensors(tmp_path):
    import timm

    model, opt = _trained()
    model.logit_scale = torch.nn.Parameter(torch.tensor(2.0))  # the CLIP-text wrapper's own parameter
    p = _save(tmp_path / "ckpt-1", model, opt)
    sd = consolidate(p, tmp_path / "out" / "vit.safetensors")
    assert "logit_scale" not in sd and not any(k.startswith("inner.") for k in sd)
    from safetensors.torch import load_file

    loaded = load_file(str(tmp_path / "out" / "vit.safetensors"))
    vit = timm.create_model(pretrained=False, **_jobs.TIMM)
    vit.load_state_dict(loaded, strict=True)
    assert all(torch.equal(v, model.inner.state_dict()[k]) for k, v in vit.state_dict().items())
    kept = consolidate(p, tmp_path / "full.pt", strip_prefix="", drop=())
    assert "logit_scale" in kept and "inner.head.weight" in kept
    with pytest.raises(ValueError, match="holds no 'ema' state"):
        consolidate(p, tmp_path / "ema.pt", key="ema")


def test_consolidate_stays_callable_after_its_cli_module_is_imported(tmp_path):
    import importlib

    importlib.import_module("advtrain.parallel.consolidate")  # the import system rebinds the package attribute
    import advtrain.parallel

    model = torch.nn.Linear(3, 2)
    p = save_checkpoint(tmp_path / "ckpt-1", model=model)
    sd = advtrain.parallel.consolidate(p, tmp_path / "out.pt", strip_prefix="")
    assert torch.equal(sd["weight"], model.weight.detach())
