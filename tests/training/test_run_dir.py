"""Run directories: config check, fresh start, resume or refusal; checkpoints; metrics truncation and torn lines."""

from __future__ import annotations

import json

import pytest
import torch

from advtrain.training import (
    Dist,
    MetricsError,
    ResumeError,
    RunDir,
    RunDirError,
    check_run_dir,
    checkpoint_files,
    environment_meta,
    load_latest_checkpoint,
    read_metrics,
    restore_training_state,
    save_checkpoint,
    training_state,
    truncate_metrics,
)

CONFIG = {"optim": {"lr": 0.001}, "data": {"batch_size": 64}, "run": {"out_dir": "x", "fresh": False}}


class Counter:
    """A stateful object (a data loader's stand-in)."""

    def __init__(self, n=0):
        self.n = n

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, s):
        self.n = s["n"]


def open_run(path, logs=None):
    run = RunDir(path, dd=Dist(), log=(logs if logs is not None else []).append)
    return run


def save(run, samples, model):
    objects = {"model": model, "loader": Counter(samples)}
    return save_checkpoint(run.path, training_state(objects, Dist(), samples_seen=samples, step=samples // 8), keep=2)


def test_a_changed_config_is_refused_naming_the_fields_in_one_line(tmp_path):
    run = open_run(tmp_path / "run")
    run.prepare(CONFIG, meta={"m": 1})
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == CONFIG
    changed = {**CONFIG, "optim": {"lr": 0.002}, "data": {"batch_size": 32}}
    with pytest.raises(RunDirError) as err:
        open_run(tmp_path / "run").prepare(changed, meta={})
    msg = str(err.value)
    assert "\n" not in msg and "holds a run with a different config" in msg
    assert "data.batch_size 64 -> 32, optim.lr 0.001 -> 0.002" in msg and "--fresh" in msg
    check_run_dir(tmp_path / "run", {**CONFIG, "run": {"out_dir": "x", "fresh": True}})  # run.fresh is not compared
    check_run_dir(tmp_path / "run", changed, fresh=True)  # a fresh start replaces the old run


def test_fresh_start_moves_the_old_run_aside_and_leaves_other_files(tmp_path):
    path = tmp_path / "run"
    logs = []
    run = open_run(path, logs)
    run.prepare(CONFIG, meta={})
    save(run, 64, torch.nn.Linear(2, 2))
    (path / "metrics.jsonl").write_text('{"kind": "train", "samples": 64}\n')
    (path / "submitit").mkdir()  # a job's own folder: never moved
    run2 = open_run(path, logs)
    run2.prepare({**CONFIG, "optim": {"lr": 0.5}}, meta={}, fresh=True)
    (old,) = path.glob("previous-*")
    assert sorted(p.name for p in old.iterdir()) == ["checkpoints", "config.json", "meta.json", "metrics.jsonl"]
    assert (path / "submitit").is_dir() and not (path / "metrics.jsonl").exists()
    assert run2.resume() is None  # a clean start
    assert any("moved the previous run's" in m and str(old) in m for m in logs)


def test_a_directory_with_metrics_or_checkpoints_but_no_usable_checkpoint_is_refused(tmp_path):
    path = tmp_path / "run"
    run = open_run(path)
    assert run.resume() is None  # nothing there: a new run
    (path / "metrics.jsonl").parent.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text('{"kind": "train", "samples": 64}\n')
    with pytest.raises(RunDirError, match="holds metrics.jsonl but no usable checkpoint.*--fresh"):
        run.resume()
    (path / "metrics.jsonl").unlink()
    p = save(run, 64, torch.nn.Linear(2, 2))
    p.write_bytes(p.read_bytes()[:100])  # truncated
    with pytest.raises(RunDirError, match=r"holds 1 checkpoint file\(s\) but no usable checkpoint"):
        run.resume()


def test_resume_cuts_the_metrics_back_to_the_checkpoint(tmp_path):
    path = tmp_path / "run"
    logs = []
    run = open_run(path, logs)
    model = torch.nn.Linear(2, 2)
    save(run, 64, model)
    rows = [{"kind": "train", "samples": s} for s in (32, 64, 96)] + [{"kind": "eval", "samples": 96}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    state = run.resume()
    assert state["samples_seen"] == 64 and state["step"] == 8
    assert [r["samples"] for r in read_metrics(path / "metrics.jsonl")] == [32, 64]
    assert any("dropped 2 metric lines" in m for m in logs)


def test_a_torn_last_metrics_line_is_dropped_with_the_file_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "samples": 32}\n{"kind": "train", "samples": 64}\n{"kind": "tr')
    logs = []
    assert read_metrics(path, log=logs.append) == [{"kind": "train", "samples": 32}, {"kind": "train", "samples": 64}]
    assert len(logs) == 1 and str(path) in logs[0] and "torn last line 3" in logs[0]
    assert truncate_metrics(path, 64, log=logs.append) == 1
    assert path.read_text() == '{"kind": "train", "samples": 32}\n{"kind": "train", "samples": 64}\n'
    assert truncate_metrics(path, 64, log=logs.append) == 0 and truncate_metrics(tmp_path / "absent", 0, log=print) == 0
    path.write_text('{"kind": "tr\n{"kind": "train", "samples": 64}\n')  # damage before the last line: not guessed
    with pytest.raises(MetricsError, match=r"metrics.jsonl:1 is not a JSON line"):
        truncate_metrics(path, 64, log=logs.append)


def test_checkpoints_keep_the_newest_and_skip_damaged_ones(tmp_path):
    run = open_run(tmp_path / "run")
    model = torch.nn.Linear(2, 2)
    for s in (8, 16, 24):
        save(run, s, model)
    files = checkpoint_files(run.path)
    assert [int(p.stem.split("-")[1]) for p in files] == [16, 24]
    assert all(p.with_suffix(".sha256").exists() for p in files) and not list(run.path.rglob("*.tmp"))
    files[-1].write_bytes(files[-1].read_bytes()[:-10])
    logs = []
    state = load_latest_checkpoint(run.path, logs.append)
    assert state["samples_seen"] == 16 and "sha256 mismatch" in logs[0] and "falling back" in logs[0]
    with pytest.raises(ValueError, match="keep must be >= 1"):
        save_checkpoint(run.path, {"samples_seen": 1}, keep=0)


def test_training_state_round_trips_model_loader_and_rng(tmp_path):
    model, loader = torch.nn.Linear(3, 1), Counter(5)
    torch.manual_seed(7)
    state = training_state({"model": model, "loader": loader, "ema": None}, Dist(), samples_seen=5)
    expected = torch.rand(3)
    assert state["world_size"] == 1 and state["ranks"][0]["loader"] == {"n": 5} and "ema" not in state
    other, loader2 = torch.nn.Linear(3, 1), Counter()
    restore_training_state(state, {"model": other, "loader": loader2}, Dist())
    assert loader2.n == 5 and torch.equal(other.weight, model.weight)
    assert torch.equal(torch.rand(3), expected)  # the global RNG continues where the saved run was


def test_resuming_with_another_world_size_says_so(tmp_path):
    state = training_state({"loader": Counter(1)}, Dist(), samples_seen=64)
    state["ranks"] = state["ranks"] * 2  # as if written by 2 processes
    with pytest.raises(ResumeError, match=r"written by 2 process\(es\).*this run has 1: resume with 2 processes"):
        restore_training_state(state, {"loader": Counter()}, Dist())
    with pytest.raises(ResumeError, match="holds no 'optim' state"):
        restore_training_state(training_state({}, Dist(), samples_seen=1), {"optim": Counter()}, Dist())


def test_checkpoints_from_before_per_rank_state_still_load():
    from advtrain.training import rng_state

    old = {"model": torch.nn.Linear(1, 1).state_dict(), "loader": {"n": 3}, "rng": rng_state(), "samples_seen": 9}
    loader = Counter()
    restore_training_state(old, {"loader": loader}, Dist())
    assert loader.n == 3


def test_environment_meta_records_provenance():
    meta = environment_meta(source=__file__, numpy="numpy", absent=("no-such-dist", "numpy"), gone="no-such-dist")
    assert {"git_revision", "git_dirty", "command", "torch", "timm", "advtrain", "world_size"} <= set(meta)
    assert meta["numpy"] == meta["absent"] and meta["numpy"] and meta["gone"] is None


def test_the_same_paths_spelled_differently_are_not_a_different_config(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    saved = {"data": {"path": str(tmp_path / "data")}, "run": {"out_dir": str(tmp_path / "run")}}
    open_run(tmp_path / "run").prepare(saved, meta={})  # as a cluster job saves it: absolute paths
    check_run_dir("run", {"data": {"path": "data"}, "run": {"out_dir": "run"}})  # a local rerun: relative ones
    with pytest.raises(RunDirError, match="data.path"):
        check_run_dir("run", {"data": {"path": "elsewhere"}, "run": {"out_dir": "run"}})
