"""robust_eval and EvalProtocol: counts, per-sample records, resume, float32 under autocast, checks before attacks."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import advtrain.eval._protocol as protocol_module
from advtrain import pgd
from advtrain.eval import (
    IMAGENET_EPS,
    EvalProtocol,
    SampleLog,
    max_sensible_eps,
    read_sample_log,
    recipe_eval,
    report_from_records,
    robust_eval,
    wilson_interval,
)
from advtrain.eval._protocol import _stable_seed
from tests.helpers import tiny_cnn

P_PGD = EvalProtocol(eps={"linf": 8 / 255, "l2": 0.5}, pgd_steps=3, pgd_rel_step=0.5, autoattack=None)


def _model(classes=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, classes)).eval()


def _batches(n=24, bs=8, seed=0, classes=4):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, 3, 4, 4, generator=g), torch.randint(0, classes, (n,), generator=g)
    keys = [f"s{i:03d}" for i in range(n)]
    return [(x[i : i + bs], y[i : i + bs], keys[i : i + bs]) for i in range(0, n, bs)]


# ------------------------------------------------------------------------------------------------ protocol


def test_protocol_lists_attacks_per_norm_and_radius():
    p = EvalProtocol(eps={"linf": [2 / 255, 4 / 255], "l1": 75}, pgd_steps=20, pgd_rel_step=0.25)
    assert [a.name for a in p.attacks] == [
        "pgd20-linf-2/255",
        "autoattack-linf-2/255",
        "pgd20-linf-4/255",
        "autoattack-linf-4/255",
        "pgd20-l1-75",
        "autoattack-l1-75",
    ]
    assert p.attacks[2].step_size == pytest.approx(1 / 255) and p.attacks[3].version == "standard"
    d = p.to_dict()
    assert d["eps"] == {"linf": [2 / 255, 4 / 255], "l1": [75.0]} and len(d["attacks"]) == 6
    json.dumps(d)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(eps={"linf": 4}, pgd_steps=0), "did you mean 4/255"),
        (dict(eps={"linf": -0.1}, pgd_steps=0), "> 0"),
        (dict(eps={"l3": 0.1}, pgd_steps=0), "unknown norm"),
        (dict(eps={}, pgd_steps=0), "map norms"),
        (dict(eps={"linf": [0.1, 0.1]}, pgd_steps=0), "repeats"),
        (dict(eps={"linf": 0.1}, pgd_steps=10), "pgd_rel_step"),
        (dict(eps={"linf": 0.1}, pgd_steps=-1), "pgd_steps"),
        (dict(eps={"linf": 0.1}, pgd_steps=0, autoattack="fast"), "autoattack must be"),
        (dict(eps={"linf": 0.1}, pgd_steps=0, autoattack=["apgd-ce", "pgd"]), "custom AutoAttack"),
    ],
)
def test_protocol_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EvalProtocol(**kwargs)


def test_radius_bounds_depend_on_the_input_size():
    d = 3 * 224 * 224
    p = EvalProtocol(eps=IMAGENET_EPS, pgd_steps=0)
    p.check_input((3, 224, 224))  # RobustBench's ImageNet radii are sensible there
    assert max_sensible_eps("l1", d) == d / 2 and max_sensible_eps("linf", d) == 0.5
    with pytest.raises(ValueError, match=r"eps 75 for l1 is above 24 on \(3, 4, 4\) images"):
        p.check_input((3, 4, 4))


# ------------------------------------------------------------------------------------------------ counts


def test_counts_match_a_direct_computation():
    model, batches = _model(), _batches()
    r = robust_eval(model, batches, protocol=P_PGD, progress=False)
    adv = {a.name: 0 for a in P_PGD.attacks}
    clean = 0
    for x, y, keys in batches:
        with torch.no_grad():
            ok = model(x).argmax(1) == y
        clean += int(ok.sum())
        for a in P_PGD.attacks:
            g = torch.Generator().manual_seed(_stable_seed(0, a.name, keys[0], len(keys)))
            xa = pgd(model, x[ok], y[ok], eps=a.eps, step_size=a.step_size, steps=a.steps, norm=a.norm, generator=g)
            with torch.no_grad():
                adv[a.name] += int((model(xa).argmax(1) == y[ok]).sum())
    assert r.n == 24 and r.counts["clean"] == clean and r.clean == clean / 24
    assert {a.name: r.counts[a.name] for a in P_PGD.attacks} == adv
    assert all(r.counts[a.name] <= clean for a in P_PGD.attacks)
    assert 0 < clean and any(adv[a] < clean for a in adv)  # the attack bites: the comparison is not vacuous


def test_records_are_written_batch_by_batch(tmp_path):
    path = tmp_path / "samples.0.jsonl"
    seen = []

    def batches():
        for b in _batches():
            seen.append(len(read_sample_log([path])))  # what is on disk when the next batch is asked for
            yield b

    robust_eval(_model(), batches(), protocol=P_PGD, results=path, progress=False)
    assert seen == [0, 8, 16]
    recs = read_sample_log([path])
    assert sorted(recs) == [f"s{i:03d}" for i in range(24)]
    r = recs["s005"]
    assert set(r) == {"key", "label", "clean", "nonfinite", *[a.name for a in P_PGD.attacks]}
    assert all(isinstance(r[a.name], bool) for a in P_PGD.attacks)


def test_resume_skips_what_is_done_and_gives_the_uninterrupted_report(tmp_path, monkeypatch):
    full = robust_eval(_model(), _batches(), protocol=P_PGD, progress=False)
    path = tmp_path / "samples.0.jsonl"

    def interrupted():
        for i, b in enumerate(_batches()):
            if i == 2:
                raise KeyboardInterrupt  # preempted while the third batch loads
            yield b

    with pytest.raises(KeyboardInterrupt):
        robust_eval(_model(), interrupted(), protocol=P_PGD, results=path, progress=False)
    done = read_sample_log([path])
    assert len(done) == 16
    attacked = []
    real = protocol_module.pgd

    def spy(model, x, y, **kw):
        attacked.append(x.shape[0])
        return real(model, x, y, **kw)

    monkeypatch.setattr(protocol_module, "pgd", spy)
    r = robust_eval(_model(), _batches(), protocol=P_PGD, results=path, done=done, progress=False)
    assert r.counts == full.counts and r.n == 24 and r.resumed == 16
    assert sum(attacked) <= 2 * 8  # only the third batch is attacked (its correct samples, two norms)
    assert len(read_sample_log([path])) == 24


def test_a_line_cut_by_a_kill_is_dropped_and_redone(tmp_path):
    path = tmp_path / "samples.0.jsonl"
    path.write_text('{"key": "a", "label": 0, "clean": true}\n{"key": "b", "lab')
    assert list(read_sample_log([path])) == ["a"]
    log = SampleLog(path)
    log.write([{"key": "c", "label": 1, "clean": False}])
    log.close()
    assert list(read_sample_log([path])) == ["a", "c"]
    path.write_text('{"key": "a"\n{"key": "c", "label": 1, "clean": false}\n')
    with pytest.raises(ValueError, match="not a JSON line"):
        read_sample_log([path])


def test_records_of_another_protocol_are_refused():
    with pytest.raises(ValueError, match="no result for"):
        report_from_records({"a": {"key": "a", "clean": True}}, P_PGD.attacks)


# ------------------------------------------------------------------------------------------------ float32


class _DtypeSpy(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = tiny_cnn(classes=4)
        self.seen: list[torch.dtype] = []
        for m in self.net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.register_forward_hook(lambda mod, inp, out: self.seen.append(out.dtype))

    def forward(self, x):
        return self.net(x)


def _images(n=16, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(n, 3, size, size, generator=g), torch.randint(0, 4, (n,), generator=g))]


def test_float32_even_under_an_outer_bf16_autocast():
    model = _DtypeSpy().eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            assert model(torch.rand(2, 3, 8, 8)).dtype == torch.bfloat16  # the outer context does cast
        model.seen.clear()
        r = robust_eval(model, _images(), protocol=P_PGD, progress=False)
    assert model.seen and set(model.seen) == {torch.float32}
    assert r.counts == robust_eval(model, _images(), protocol=P_PGD, progress=False).counts
    assert torch.is_autocast_enabled("cpu") is False


def test_tf32_flags_are_off_inside_and_restored():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.allow_tf32 = True
    try:
        flags = []

        class Probe(nn.Module):
            def forward(self, x):
                flags.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
                return torch.zeros(x.shape[0], 4, requires_grad=True) + x.mean() * 0

        robust_eval(
            Probe(),
            _images(n=2),
            protocol=EvalProtocol(eps={"linf": 0.1}, pgd_steps=0, autoattack=None),
            progress=False,
        )
        assert flags and set(flags) == {(False, False)}
        assert torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_a_bf16_model_is_refused():
    with pytest.raises(ValueError, match=r"float32; the model holds \['torch.bfloat16'\]"):
        robust_eval(_model().bfloat16(), _batches(), protocol=P_PGD, progress=False)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.fixture
def no_attack(monkeypatch):
    calls = []
    monkeypatch.setattr(protocol_module, "pgd", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(protocol_module, "autoattack", lambda *a, **k: calls.append(1))
    yield calls
    assert calls == []  # every error came before the first attack


def test_class_count_mismatch_stops_before_any_attack(no_attack):
    with pytest.raises(ValueError, match="the model has 4 outputs but the data has 10 classes"):
        robust_eval(_model(), _batches(), protocol=P_PGD, num_classes=10, progress=False)


def test_labels_outside_the_head_stop_before_any_attack(no_attack):
    x, y, k = _batches()[0]
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        robust_eval(_model(), [(x, y + 4, k)], protocol=P_PGD, progress=False)


def test_radius_too_large_for_the_images_stops_before_any_attack(no_attack):
    p = EvalProtocol(eps={"l2": 4.0}, pgd_steps=2, pgd_rel_step=0.5, autoattack=None)
    with pytest.raises(ValueError, match="eps 4 for l2 is above 3.4641"):
        robust_eval(_model(), _batches(), protocol=p, progress=False)


def test_images_outside_the_box_are_refused_and_uint8_is_scaled(no_attack):
    x, y, k = _batches()[0]
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        robust_eval(_model(), [(x * 2 - 0.5, y, k)], protocol=P_PGD, progress=False)
    p = EvalProtocol(eps={"linf": 0.1}, pgd_steps=0, autoattack=None)
    r8 = robust_eval(_model(), [((x * 255).round().to(torch.uint8), y, k)], protocol=p, progress=False)
    rf = robust_eval(_model(), [((x * 255).round() / 255, y, k)], protocol=p, progress=False)
    assert r8.counts == rf.counts


def test_repeated_keys_are_refused():
    x, y, k = _batches()[0]
    with pytest.raises(ValueError, match="repeats keys"):
        robust_eval(_model(), [(x, y, ["a"] * 8)], protocol=P_PGD, progress=False)


def test_nonfinite_logits_count_as_wrong():
    class Nan(nn.Module):
        def forward(self, x):
            out = torch.zeros(x.shape[0], 4)
            out[:, 0] = 1
            out[0] = float("nan")
            return out + 0 * x.sum()

    x = torch.rand(4, 3, 2, 2)
    r = robust_eval(
        Nan(),
        [(x, torch.zeros(4, dtype=torch.int64))],
        protocol=EvalProtocol(eps={"linf": 0.1}, pgd_steps=0, autoattack=None),
        progress=False,
    )
    assert r.counts["clean"] == 3 and r.nonfinite == 1


# ------------------------------------------------------------------------------------------------ AutoAttack


def test_autoattack_batch_equals_pyautoattack_and_leaves_the_global_rng_alone():
    from pyautoattack import AutoAttack

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 10)).eval()
    with torch.no_grad():
        model[1].weight.mul_(20)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(16, 3, 4, 4, generator=g), torch.randint(0, 10, (16,), generator=g)
    with torch.no_grad():
        y = torch.where(torch.rand(16, generator=g) < 0.7, model(x).argmax(1), y)  # most samples start correct
    p = EvalProtocol(eps={"linf": 0.03}, pgd_steps=0, autoattack=("apgd-ce", "apgd-t"), seed=3)
    state = torch.get_rng_state()
    r = robust_eval(model, [(x, y, [str(i) for i in range(16)])], protocol=p, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    aa = AutoAttack(model, norm="Linf", eps=0.03, version="custom", attacks=["apgd-ce", "apgd-t"], seed=3, device="cpu")
    x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=16)
    with torch.no_grad():
        ref = int(((model(x_adv).argmax(1) == y) & (model(x).argmax(1) == y)).sum())
    assert r.counts["autoattack-linf-0.03"] == ref
    assert 0 < ref < r.counts["clean"]  # the attack bites and some samples survive


# ------------------------------------------------------------------------------------------------ report


def test_report_table_and_dict():
    r = robust_eval(_model(), _batches(), protocol=P_PGD, progress=False)
    t = r.table()
    assert t.splitlines()[0] == "| attack | norm | eps | accuracy (%) | 95% CI | correct / n |"
    assert "| PGD-3 | linf | 8/255 |" in t and "| PGD-3 | l2 | 0.5 |" in t
    assert f"| {r.counts['clean']} / 24 |" in t
    d = r.to_dict()
    assert d["n"] == 24 and set(d["robust"]) == {"pgd3-linf-8/255", "pgd3-l2-0.5"}
    json.dumps(d)


def test_wilson_interval_contains_the_estimate():
    for k, n in [(0, 10), (10, 10), (3, 7), (2500, 5000)]:
        lo, hi = wilson_interval(k, n)
        assert 0 <= lo <= k / n <= hi <= 1
    lo, hi = wilson_interval(2500, 5000)
    assert hi - lo == pytest.approx(2 * 1.96 * (0.25 / 5000) ** 0.5, rel=1e-3)


# ------------------------------------------------------------------------------------------------ recipes


def test_recipe_eval_is_robust_eval_with_short_keys(tmp_path):
    model, batches = _model(), [(x, y) for x, y, _ in _batches()]
    out = recipe_eval(
        model,
        lambda: batches,
        norms=("linf", "l2"),
        eps={"linf": 8 / 255, "l2": 0.5, "l1": 9.0},
        pgd_steps=3,
        pgd_step_size=4 / 255,
        autoattack_samples=0,
        seed=0,
        results=tmp_path / "s.jsonl",
    )
    keyed = [(x, y, [str(8 * i + j) for j in range(len(y))]) for i, (x, y) in enumerate(batches)]
    r = robust_eval(model, keyed, protocol=P_PGD, progress=False)
    assert out == {"clean": r.clean, "n": 24, "pgd3": r.robust["pgd3-linf-8/255"], "pgd3-l2": r.robust["pgd3-l2-0.5"]}
    assert len(read_sample_log([tmp_path / "s.jsonl"])) == 24


def test_recipe_eval_refuses_unknown_norms_and_a_changed_order():
    model, batches = _model(), [(x, y) for x, y, _ in _batches()]
    common = dict(pgd_steps=0, pgd_step_size=0.0, seed=0, results=None)
    with pytest.raises(ValueError, match="eval norms must be some of"):
        recipe_eval(model, lambda: batches, norms=("linf", "l3"), eps={"linf": 0.1}, autoattack_samples=0, **common)
    calls = []

    def flipping():  # the second pass (AutoAttack's) sees the samples in another order
        calls.append(1)
        return batches if len(calls) == 1 else [(x.flip(0), y.flip(0)) for x, y in batches[::-1]]

    with pytest.raises(ValueError, match="same order on every pass"):
        recipe_eval(model, flipping, norms=("linf",), eps={"linf": 0.1}, autoattack_samples=8, **common)
