"""Metrics JSON lines and the optional TensorBoard / Weights & Biases sinks beside them."""

from __future__ import annotations

import sys
import types

import pytest

from advtrain.training import MetricsLog, TensorBoardSink, WandbSink, check_sinks, open_sinks, read_metrics


class Recorder:
    def __init__(self):
        self.calls, self.closed = [], False

    def write(self, scalars, step):
        self.calls.append((scalars, step))

    def close(self):
        self.closed = True


def test_rows_go_to_the_file_and_their_finite_scalars_to_the_sinks(tmp_path):
    sink = Recorder()
    with MetricsLog(tmp_path / "m.jsonl", sinks=(sink,)) as m:
        m.write({"kind": "train", "samples": 64, "step": 2, "stage": "coarse", "loss": 2.5, "acc": float("nan")})
        m.write({"kind": "eval", "samples": 128, "clean": 0.5, "ok": True})
    assert read_metrics(tmp_path / "m.jsonl")[0]["stage"] == "coarse"
    assert sink.calls == [({"train/loss": 2.5}, 64), ({"eval/clean": 0.5}, 128)] and sink.closed


def test_other_ranks_write_nothing(tmp_path):
    m = MetricsLog(tmp_path / "m.jsonl", enabled=False)
    m.write({"kind": "train", "samples": 1})
    m.close()
    assert not (tmp_path / "m.jsonl").exists()


def test_tensorboard_sink_writes_readable_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (sink,) = open_sinks(tmp_path, tensorboard=True, wandb=None, config={})
    with MetricsLog(tmp_path / "m.jsonl", sinks=(sink,)) as m:
        for s, loss in ((32, 2.0), (64, 1.5)):
            m.write({"kind": "train", "samples": s, "loss": loss})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(32, 2.0), (64, 1.5)]


def test_wandb_sink_logs_at_the_samples_seen_and_keeps_one_run_id(tmp_path, monkeypatch):
    runs = []

    class FakeRun:
        def __init__(self, **kw):
            self.kw, self.logged, self.finished = kw, [], False

        def log(self, scalars, step):
            self.logged.append((scalars, step))

        def finish(self):
            self.finished = True

    def init(**kw):
        runs.append(FakeRun(**kw))
        return runs[-1]

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    sink = WandbSink(tmp_path, project="p", config={"a": 1})
    sink.write({"train/loss": 1.0}, 64)
    sink.close()
    WandbSink(tmp_path, project="p", config={"a": 1})  # a resumed run
    assert runs[0].logged == [({"train/loss": 1.0}, 64)] and runs[0].finished
    assert runs[0].kw["id"] == runs[1].kw["id"] and runs[0].kw["resume"] == "allow" and runs[0].kw["project"] == "p"


def test_a_missing_extra_is_named_in_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("tensorboard", "wandb") else real(name, *a)
    )
    with pytest.raises(
        ValueError,
        match=r"^run.tensorboard=true needs the 'tensorboard' package: pip install "
        r"'advtrain\[tensorboard\]'$",
    ):
        check_sinks(tensorboard=True, wandb=None)
    with pytest.raises(ValueError, match=r"run.wandb needs the 'wandb' package: pip install 'advtrain\[wandb\]'"):
        check_sinks(tensorboard=False, wandb="proj")
    check_sinks(tensorboard=False, wandb=None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install 'advtrain\[tensorboard\]'"):
        TensorBoardSink("x")
