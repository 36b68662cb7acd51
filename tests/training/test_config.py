"""Typed config building, dotted overrides with one-line errors, config differences, the shared run section."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal

import pytest

from advtrain.training import ConfigError, RunConfig, choose, config_diff, from_dict, load_config, override


@dataclass(frozen=True, kw_only=True)
class Optim:
    lr: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)
    steps: int = 10
    warmup: float | None = None

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")


@dataclass(frozen=True, kw_only=True)
class Stage:
    name: str
    samples: int


@dataclass(frozen=True, kw_only=True)
class Config:
    method: Literal["a", "b"] = "a"
    optim: Optim = field(default_factory=Optim)
    stages: tuple[Stage, ...] = (Stage(name="s0", samples=10), Stage(name="s1", samples=20))
    extra: Optim | None = None
    run: RunConfig = field(default_factory=RunConfig)


def test_round_trip_through_json(tmp_path):
    cfg = Config(extra=Optim(lr=0.5))
    path = tmp_path / "c.json"
    path.write_text(json.dumps(dataclasses.asdict(cfg)))
    assert load_config(Config, path) == cfg


@pytest.mark.parametrize(
    "item, message",
    [
        ("optim.lr=fast", "optim.lr: 'fast' is not a float"),
        ('optim.steps="many"', "optim.steps: 'many' is not an int"),
        ("optim.steps=1.5", "optim.steps: 1.5 is not an int"),
        ("optim.steps=true", "optim.steps: True is not an int"),
        ("optim.betas=[0.9]", "optim.betas: [0.9] is not a list of 2 values"),
        ('optim.betas=[0.9, "x"]', "optim.betas.1: 'x' is not a float"),
        ("optim.warmup=soon", "optim.warmup: 'soon' is not a float or None"),
        ("method=c", "method: 'c' is not one of ('a', 'b')"),
        ("stages.1.samples=x", "stages.1.samples: 'x' is not an int"),
        ("optim.lr=-1", "optim: lr must be > 0; got -1.0"),
        ("optim.learning_rate=1", "no field 'learning_rate' in optim"),
        ("stages.5.samples=1", "stages has no item '5' (it has 2)"),
        ("extra.lr=1", "extra is None here; set it whole first"),
        ("optim.lr.x=1", "optim.lr is 0.1, not a section"),
        ("optim.lr", "is not of the form dotted.key=value"),
        ("run.log_every=0", "run.log_every: 0 is not an int >= 1"),
        ("run.device=gpu", "run.device: 'gpu' is not null, 'cpu'"),
    ],
)
def test_override_errors_name_the_key_and_the_value_in_one_line(item, message):
    with pytest.raises(ConfigError) as err:
        override(Config(), [item])
    assert message in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)


def test_overrides_apply_in_order_and_keep_the_types():
    cfg = override(
        Config(),
        [
            "optim.lr=1",
            "stages.0.samples=1e6",
            "optim.warmup=2",
            'extra={"lr": 3}',
            "optim.betas=[0.8, 0.9]",
            'run.out_dir="runs/x"',
            "run.out_dir=runs/y",
            "method=b",
        ],
    )
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.stages[0].samples == 1_000_000 and isinstance(cfg.stages[0].samples, int)
    assert cfg.optim.warmup == 2.0 and cfg.extra == Optim(lr=3.0) and cfg.optim.betas == (0.8, 0.9)
    assert cfg.run.out_dir == "runs/y" and cfg.method == "b"
    assert override(cfg, ['stages=[{"name": "only", "samples": 5}]']).stages == (Stage(name="only", samples=5),)


def test_unknown_fields_are_named():
    with pytest.raises(ConfigError, match=r"unknown Optim fields in optim: \['lrr'\]"):
        from_dict(Config, {"optim": {"lrr": 1}})


def test_config_diff_names_each_changed_field():
    a = dataclasses.asdict(Config())
    b = dataclasses.asdict(override(Config(), ["optim.lr=0.2", "stages.1.samples=30", "run.fresh=true"]))
    assert config_diff(a, b) == ["optim.lr 0.1 -> 0.2", "run.fresh false -> true", "stages.1.samples 20 -> 30"]
    assert config_diff(a, b, ignore=("run.fresh", "stages")) == ["optim.lr 0.1 -> 0.2"]
    three = dataclasses.asdict(override(Config(), ['stages=[{"name": "a", "samples": 1}]']))
    assert config_diff(a, three) == [f"stages {json.dumps(a['stages'])} -> {json.dumps(three['stages'])}"]
    older = {k: v for k, v in a.items() if k != "extra"}  # a config saved before a field existed
    assert config_diff(older, a) == ["extra (absent) -> null"] and config_diff(older, a, missing_ok=True) == []


def test_choose_lists_the_options():
    assert choose({"x": 1}, "x") == 1
    with pytest.raises(ValueError, match=r"unknown preset 'y'; choose from \['x'\]"):
        choose({"x": 1}, "y")
