"""The config field validators: what each accepts, and one-line messages with the dotted key through from_dict."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from advtrain.training import ConfigError, FieldError, from_dict, override
from advtrain.training import validators as v


@pytest.mark.parametrize(
    "norm, good, bad",
    [
        ("linf", [1e-6, 4 / 255, 0.999], [0.0, 1.0, 2.0, -0.1, math.nan, math.inf, True]),
        ("l2", [0.5, 3.0, 64.0], [0.0, 64.5, -1.0, math.nan]),
        ("l1", [12.0, 255.0, 4096.0], [0.0, 5000.0, math.inf]),
    ],
)
def test_eps_for_norm_accepts_sensible_radii_only(norm, good, bad):
    for eps in good:
        v.eps_for_norm(eps, norm=norm, key="eps")
    for eps in bad:
        with pytest.raises(FieldError, match=r"^eps: ") as err:
            v.eps_for_norm(eps, norm=norm, key="eps")
        assert "\n" not in str(err.value)
    v.eps_for_norm(0.0, norm=norm, key="eps", allow_zero=True)


def test_an_linf_eps_in_255_units_gets_the_hint():
    with pytest.raises(FieldError, match=r"did you mean 8/255 = 0\.031373\?"):
        v.eps_for_norm(8, norm="linf", key="eps")
    with pytest.raises(FieldError) as err:  # no hint for a value no /255 reading explains
        v.eps_for_norm(300.0, norm="linf", key="eps")
    assert "did you mean" not in str(err.value)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: v.positive(0, key="k"), "k: 0 is not a finite number > 0"),
        (lambda: v.positive(math.nan, key="k"), "k: nan is not a finite number > 0"),
        (lambda: v.positive(True, key="k"), "k: True is not a finite number > 0"),
        (lambda: v.non_negative(-1, key="k"), "k: -1 is not a finite number >= 0"),
        (lambda: v.in_range(1.0, 0, 1, key="k", hi_open=True), "k: 1.0 is not in [0, 1)"),
        (lambda: v.in_range(0, 0, 1, key="k", lo_open=True), "k: 0 is not in (0, 1]"),
        (lambda: v.divisible(30, 16, key="k"), "k: 30 is not divisible by 16"),
        (lambda: v.device_name("cuda:x", key="k"), "k: 'cuda:x' is not null, 'cpu', 'cuda', 'cuda:N' or 'mps'"),
        (lambda: v.non_empty(" ", key="k"), "k: ' ' is not a non-empty string"),
    ],
)
def test_each_validator_names_the_key_the_value_and_the_range(call, message):
    with pytest.raises(FieldError) as err:
        call()
    assert str(err.value) == message


def test_valid_values_pass():
    v.positive(None, key="k", optional=True)
    v.in_range(0.5, 0, 1, key="k", lo_open=True, hi_open=True)
    v.divisible(224, 16, key="k")
    for d in (None, "cpu", "cuda", "cuda:3", "mps"):
        v.device_name(d, key="k")


@dataclass(frozen=True, kw_only=True)
class Attack:
    eps: float = 4 / 255

    def __post_init__(self):
        v.eps_for_norm(self.eps, norm="linf", key="eps")


@dataclass(frozen=True, kw_only=True)
class Stage:
    attack: Attack = field(default_factory=Attack)


@dataclass(frozen=True, kw_only=True)
class Config:
    stages: tuple[Stage, ...] = (Stage(), Stage())
    extra: Attack | None = None


def test_from_dict_prefixes_the_sections_dotted_key():
    with pytest.raises(ConfigError) as err:
        override(Config(), ["stages.1.attack.eps=2"])
    assert str(err.value).startswith("stages.1.attack.eps: 2.0 is not an l_inf radius")
    with pytest.raises(ConfigError, match=r"^extra\.eps: 3\.0 is not"):  # an optional section reports its field
        from_dict(Config, {"extra": {"eps": 3}})


def test_data_counts():
    @dataclass(frozen=True)
    class Data:
        batch_size: int = 8
        num_workers: int = 0
        val_samples: int | None = None

    v.check_data_counts(Data())
    for bad, message in (
        (Data(num_workers=-1), "data.num_workers: -1 is not an int >= 0"),
        (Data(batch_size=0), "data.batch_size: 0 is not an int >= 1"),
        (Data(val_samples=0), "data.val_samples: 0 is not an int >= 1 (or null: all)"),
    ):
        with pytest.raises(FieldError) as err:
            v.check_data_counts(bad)
        assert str(err.value) == message
