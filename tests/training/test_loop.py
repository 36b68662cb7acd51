"""Progress display, loop timing, logging cadence, the warning filter and the metrics plot."""

from __future__ import annotations

import io
import time
import warnings

import pytest
import torch

from advtrain.training import (
    Dist,
    Every,
    Panel,
    Progress,
    StepTimer,
    all_mean,
    autocast,
    check_finite,
    cycle,
    gather_per_rank,
    log_due,
    make_mixup,
    plot_metrics,
    quiet_set_vital,
    take,
)


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_without_a_terminal_there_is_no_bar_but_a_line_every_n_steps(capsys):
    lines = []
    p = Progress(total=10, initial=2, unit="step", desc="run", dd=Dist(), every=3, log=lines.append)
    for _ in range(8):
        p.update(1, loss=0.5)
    p.close()
    assert capsys.readouterr().out == ""  # pytest's stdout is not a terminal: no bar drawn
    assert [line.split(" (")[0] for line in lines] == ["run 5/10 step", "run 8/10 step", "run 10/10 step"]
    assert "loss 0.5" in lines[0] and "eta" in lines[0]


def test_on_a_terminal_the_bar_redraws_a_few_times_a_second_at_most(monkeypatch):
    out = FakeTTY()
    monkeypatch.setattr("sys.stdout", out)
    p = Progress(total=20_000, initial=0, unit="img", desc="run", dd=Dist(), every=50, log=print, min_interval=0.5)
    start = time.perf_counter()
    for _ in range(2_000):
        p.update(10, loss=1.0)
    elapsed = time.perf_counter() - start
    p.close()
    redraws = out.getvalue().count("\r")
    assert redraws <= 2 * (elapsed / 0.5 + 2), (redraws, elapsed)  # initial + final + at most 2 a second
    assert "20.0k/20.0k" in out.getvalue()


def test_other_ranks_show_nothing():
    lines = []
    p = Progress(
        total=4, initial=0, unit="step", desc="run", dd=Dist(rank=1, world=2), every=1, log=lines.append, tty=False
    )
    p.update(1)
    assert lines == []


def test_step_timer_separates_the_data_wait_from_the_step():
    def slow():
        while True:
            time.sleep(0.05)
            yield torch.zeros(4)

    t = StepTimer(torch.device("cpu"), {"train_seconds": 10.0, "seconds": 100.0})
    batches = slow()
    for _ in range(2):
        t.next(batches)
        time.sleep(0.02)  # the step
        t.done(4)
    w = t.window()
    assert 0.05 <= w["data_wait_s"] < 0.2
    assert 8 / (2 * 0.2) < w["img_per_s"] <= 8 / (2 * 0.07)  # images over the whole iterations, data wait included
    assert 10.04 <= t.train_seconds < 10.3  # steps only, on top of the earlier process's
    assert t.seconds >= 100.14 and t.state()["train_seconds"] == t.train_seconds
    assert all(v != v for v in t.window().values())  # an empty window: NaN, not a fake number


def test_log_cadence_every_and_cycle():
    assert [s for s in range(1, 11) if log_due(s, every=4, total=10)] == [1, 4, 8, 10]
    assert [s for s in range(1, 4) if log_due(s, every=50, total=3)] == [1, 3]  # a short run still has a curve
    due = Every(64, start=0)
    assert [x for x in (32, 64, 96, 160, 170) if due(x) or x == 170 and due(x, force=True)] == [64, 160, 170]
    assert [next(it) for it in [cycle([1, 2])] for _ in range(5)] == [1, 2, 1, 2, 1]
    with pytest.raises(ValueError):
        Every(0)


def test_small_loop_pieces():
    assert all_mean({"a": 1.0}, Dist()) == {"a": 1.0} and gather_per_rank(3, Dist()) == [3]
    with pytest.raises(FloatingPointError, match="at step 7 .stage fine.; lower optim.lr"):
        check_finite(float("nan"), step=7, where="stage fine")
    with autocast("bf16", torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        autocast("fp16", torch.device("cpu"))
    assert make_mixup(mixup=0.0, cutmix=0.0, label_smoothing=0.1, num_classes=10) is None
    assert make_mixup(mixup=0.2, cutmix=0.0, label_smoothing=0.1, num_classes=10).mixup_alpha == 0.2
    batches = [[torch.zeros(4, 1), torch.arange(4)] for _ in range(3)]
    assert [len(b[1]) for b in take(batches, 10)] == [4, 4, 2] and sum(len(b[1]) for b in take(batches, None)) == 12


def test_the_set_vital_filter_hides_that_warning_only():
    from torchdata.stateful_dataloader import StatefulDataLoader

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_set_vital():
            StatefulDataLoader(list(range(4)), batch_size=2)
            warnings.warn("another warning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["another warning"]


def test_plot_draws_short_runs_and_returns_none_without_training_rows(tmp_path):
    rows = [
        {"kind": "train", "samples": 32, "loss": 2.0},
        {"kind": "train", "samples": 64, "loss": 1.8},
        {"kind": "eval", "samples": 64, "clean": 0.5, "pgd3": 0.2, "n": 10},
    ]
    panels = [
        Panel(title="loss", keys=("loss",)),
        Panel(title="acc", kind="eval", scale=100, keys=lambda k: k in ("clean", "pgd3")),
    ]
    assert plot_metrics(rows[2:], tmp_path / "a.png", panels=panels) is None
    path = plot_metrics(rows, tmp_path / "m.png", panels=panels, total=64, edges=[(32, "coarse | fine")])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
