"""Field validators for config sections: one-line errors that name the key, the bad value and what is allowed.

A section calls them in its ``__post_init__`` with the field's name; :func:`advtrain.training.from_dict` (and so
``override`` and ``load_config``) prefixes the section's dotted key, so a user reads
``stages.0.attack.eps: 2.0 is not an l_inf radius in [0, 1) (pixels in [0, 1]); did you mean 2/255 = 0.007843?``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from advtrain.training._config import ConfigError

# Upper bounds of a sensible attack radius for pixels in [0, 1]. l_inf: the whole box. l_2 / l_1: far above the
# radii used in the literature (l_2 0.5 on CIFAR-10 and 3-4 on ImageNet; l_1 12 on CIFAR-10, 255 on ImageNet) yet
# far below a 224 px image's diameter (sqrt(150528) = 388 for l_2, 150528 for l_1), where "eps" stops meaning
# "imperceptible" and a typo (an l_inf value given in 0..255 units) is the likely cause.
EPS_BOUNDS = {"linf": 1.0, "l2": 64.0, "l1": 4096.0}


class FieldError(ConfigError):
    """A section field that fails its check; ``from_dict`` prefixes the section's dotted key to ``field``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.detail = field, message


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check(ok: bool, *, key: str, value: Any, allowed: str) -> None:
    """Raises :class:`FieldError` ``key: value is not allowed`` unless ``ok``.

    Example:
        >>> check(3 > 4, key="steps", value=3, allowed="greater than 4")
        Traceback (most recent call last):
        ...
        advtrain.training._validate.FieldError: steps: 3 is not greater than 4
    """
    if not ok:
        raise FieldError(key, f"{value!r} is not {allowed}")


def positive(value: Any, *, key: str, optional: bool = False) -> None:
    """``value`` is a finite number > 0 (or None, when ``optional``).

    Example:
        >>> positive(0, key="run.log_every")
        Traceback (most recent call last):
        ...
        advtrain.training._validate.FieldError: run.log_every: 0 is not a finite number > 0
    """
    if value is None and optional:
        return
    check(
        _number(value) and math.isfinite(value) and value > 0,
        key=key,
        value=value,
        allowed="a finite number > 0" + (" (or null)" if optional else ""),
    )


def non_negative(value: Any, *, key: str, optional: bool = False) -> None:
    """``value`` is a finite number >= 0 (or None, when ``optional``)."""
    if value is None and optional:
        return
    check(
        _number(value) and math.isfinite(value) and value >= 0,
        key=key,
        value=value,
        allowed="a finite number >= 0" + (" (or null)" if optional else ""),
    )


def in_range(
    value: Any, lo: float, hi: float, *, key: str, lo_open: bool = False, hi_open: bool = False, optional: bool = False
) -> None:
    """``lo <= value <= hi`` (``<`` on an open side), e.g. ``in_range(p, 0, 1, lo_open=True)`` for (0, 1].

    Example:
        >>> in_range(1.5, 0, 1, key="adv.p_adv", lo_open=True)
        Traceback (most recent call last):
        ...
        advtrain.training._validate.FieldError: adv.p_adv: 1.5 is not in (0, 1]
    """
    if value is None and optional:
        return
    ok = (
        _number(value)
        and math.isfinite(value)
        and (lo < value if lo_open else lo <= value)
        and (value < hi if hi_open else value <= hi)
    )
    check(ok, key=key, value=value, allowed=f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")


def each(values: Iterable, validator, *, key: str, **kwargs) -> None:
    """Applies ``validator`` to every item, naming ``key.i``."""
    for i, v in enumerate(values):
        validator(v, key=f"{key}.{i}", **kwargs)


def non_empty(value: Any, *, key: str) -> None:
    """``value`` is a non-blank string."""
    check(isinstance(value, str) and value.strip() != "", key=key, value=value, allowed="a non-empty string")


def eps_for_norm(value: Any, *, norm: str, key: str, allow_zero: bool = False) -> None:
    """An attack radius (or step) that makes sense for ``norm`` on pixels in [0, 1].

    l_inf: in (0, 1) (a radius of 1 covers the whole box); a value >= 1 that looks like a count of 1/255 steps gets
    a hint (``eps=4`` -> ``4/255 = 0.0157``). l_2 / l_1: in (0, :data:`EPS_BOUNDS`]. ``allow_zero``: 0 is allowed
    (no attack).

    Example:
        >>> eps_for_norm(2.0, norm="linf", key="adv.eps")
        Traceback (most recent call last):
        ...
        advtrain.training._validate.FieldError: adv.eps: 2.0 is not an l_inf radius in (0, 1) (pixels in [0, 1]); did you mean 2/255 = 0.007843?
    """
    if norm not in EPS_BOUNDS:
        raise FieldError(key, f"unknown norm {norm!r}; choose from {sorted(EPS_BOUNDS)}")
    if allow_zero and value == 0 and _number(value):
        return
    hi = EPS_BOUNDS[norm]
    lo = "[0" if allow_zero else "(0"
    if norm == "linf":
        if not (_number(value) and math.isfinite(value) and 0 < value < 1):
            hint = f"; did you mean {value:g}/255 = {value / 255:.6f}?" if _number(value) and 1 <= value <= 255 else ""
            raise FieldError(key, f"{value!r} is not an l_inf radius in {lo}, 1) (pixels in [0, 1]){hint}")
        return
    name = {"l2": "l_2", "l1": "l_1"}[norm]
    if not (_number(value) and math.isfinite(value) and 0 < value <= hi):
        raise FieldError(
            key,
            f"{value!r} is not an {name} radius in {lo}, {hi:g}] (pixels in [0, 1]; larger radii "
            f"are not small perturbations)",
        )


def divisible(value: Any, by: int, *, key: str, what: str = "") -> None:
    """``value`` is a multiple of ``by`` (e.g. an image size and a ViT's patch size).

    Example:
        >>> divisible(30, 4, key="eval.img_size", what="the patch size {} of vit_tiny")
        Traceback (most recent call last):
        ...
        advtrain.training._validate.FieldError: eval.img_size: 30 is not divisible by the patch size 4 of vit_tiny
    """
    check(
        isinstance(value, int) and value % by == 0,
        key=key,
        value=value,
        allowed=f"divisible by {what.format(by) if what else by}",
    )


def device_name(value: Any, *, key: str) -> None:
    """``None``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    if value is None:
        return
    ok = isinstance(value, str) and (
        value in ("cpu", "cuda", "mps") or (value.startswith("cuda:") and value[5:].isdigit())
    )
    check(ok, key=key, value=value, allowed="null, 'cpu', 'cuda', 'cuda:N' or 'mps'")


def check_data_counts(data: Any, *, key: str = "data") -> None:
    """The counts of a recipe's ``data`` section: ``batch_size >= 1``, ``num_workers >= 0``, ``val_samples``
    (and ``train_size``, where the section has one) null or >= 1, ``img_size`` (where present) >= 1.

    Kept outside the Data dataclasses (a recipe's ``TrainConfig.__post_init__`` calls it), so a recipe's data
    section can change without touching these checks.
    """

    def whole(name: str, least: int, optional: bool = False) -> None:
        if not hasattr(data, name):
            return
        v = getattr(data, name)
        if v is None and optional:
            return
        check(
            isinstance(v, int) and not isinstance(v, bool) and v >= least,
            key=f"{key}.{name}",
            value=v,
            allowed=f"an int >= {least}" + (" (or null: all)" if optional else ""),
        )

    whole("batch_size", 1)
    whole("num_workers", 0)
    whole("val_samples", 1, optional=True)
    whole("train_size", 1, optional=True)
    whole("img_size", 1)
