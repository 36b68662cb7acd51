"""Config dataclasses from plain data: typed building, dotted overrides, JSON files, and config differences."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value that cannot be read: the message names the dotted key and the value, in one line."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The ``run`` section every recipe shares: where the run lives, how it logs, checkpoints and resumes.

    A recipe subclasses it to add its own options (and its own ``out_dir`` default); the toolkit's run directory,
    metrics, progress and checkpoint helpers read these fields.
    """

    out_dir: str = "runs/run"  # the run directory (config, metrics, checkpoints, plots)
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "bf16"  # bf16: autocast (the weights stay fp32)
    checkpoint_every: int = 1_000_000  # samples between checkpoints (and one at every stage's end and the end)
    keep_checkpoints: int = 2  # the newest ones kept
    log_every: int = 50  # steps between metric lines (the first and the last step are always logged)
    device: str | None = None  # default: cuda if available, else cpu
    threads: int | None = None  # torch intra-op threads on CPU (None: torch's default)
    fresh: bool = False  # start over: move an existing run's files in out_dir aside (launcher: --fresh)
    tensorboard: bool = False  # also write TensorBoard events to out_dir/tensorboard (extra: advtrain[tensorboard])
    wandb: str | None = None  # also log to this Weights & Biases project (extra: advtrain[wandb])
    parallel: Literal["ddp", "fsdp"] = "ddp"  # fsdp: FSDP2 shards params, grads, AdamW per block (advtrain.parallel)
    activation_checkpointing: bool = False  # recompute each block in the backward: less memory, ~4/3 the compute

    def __post_init__(self):
        from advtrain.training import _validate as v

        v.check(self.parallel in ("ddp", "fsdp"), key="parallel", value=self.parallel, allowed="'ddp' or 'fsdp'")
        v.check(
            isinstance(self.activation_checkpointing, bool),
            key="activation_checkpointing",
            value=self.activation_checkpointing,
            allowed="true or false",
        )
        v.non_empty(self.out_dir, key="out_dir")
        v.check(isinstance(self.seed, int) and self.seed >= 0, key="seed", value=self.seed, allowed="an int >= 0")
        for name in ("checkpoint_every", "keep_checkpoints", "log_every"):
            value = getattr(self, name)
            v.check(isinstance(value, int) and value >= 1, key=name, value=value, allowed="an int >= 1")
        v.device_name(self.device, key="device")
        v.check(
            self.threads is None or (isinstance(self.threads, int) and self.threads >= 1),
            key="threads",
            value=self.threads,
            allowed="null (torch's default) or an int >= 1",
        )
        if self.wandb is not None:
            v.non_empty(self.wandb, key="wandb")


def choose(options: dict[str, Any], name: str, *, what: str = "preset") -> Any:
    """``options[name]``, or a ``ValueError`` listing the names there are.

    Example:
        >>> choose({"small": 1}, "large")
        Traceback (most recent call last):
        ...
        ValueError: unknown preset 'large'; choose from ['small']
    """
    if name not in options:
        raise ValueError(f"unknown {what} {name!r}; choose from {sorted(options)}")
    return options[name]


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("None" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        return "a list of " + (_type_name(args[0]) if args and args[-1] is Ellipsis else f"{len(args)} values")
    if origin is Literal:
        return f"one of {args}"
    name = getattr(tp, "__name__", str(tp))
    return {"int": "an int", "float": "a float", "str": "a string", "bool": "a bool", "dict": "a dict"}.get(name, name)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """``value`` read as type ``tp``; raises :class:`ConfigError` naming ``key`` and the value."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if value is None:
        if origin in (typing.Union, types.UnionType) and type(None) in args or tp is Any:
            return None
        raise ConfigError(f"{key}: None is not {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: {value!r} is not a section (a dict of {tp.__name__} fields)")
        return from_dict(tp, value, key=key)
    if origin in (typing.Union, types.UnionType):
        real = [a for a in args if a is not type(None)]
        if len(real) == 1 and dataclasses.is_dataclass(real[0]):  # an optional section: its own error, by key
            return _coerce(real[0], value, key)
        for a in args:
            if a is not type(None):
                try:
                    return _coerce(a, value, key)
                except ConfigError:
                    continue
        raise ConfigError(f"{key}: {value!r} is not {_type_name(tp)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: {value!r} is not {_type_name(tp)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}.{i}") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: {value!r} is not {_type_name(tp)}")
        return tuple(_coerce(a, v, f"{key}.{i}") for i, (a, v) in enumerate(zip(args, value)))
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {args}")
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if (
        tp is int
        and isinstance(value, float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value == int(value)
    ):
        return int(value)  # 1e6 samples
    wrong = not isinstance(value, tp) or (tp is int and isinstance(value, bool))
    if tp in (int, str, bool, float, dict, list) and wrong:
        raise ConfigError(f"{key}: {value!r} is not {_type_name(tp)}")
    return value


def from_dict(cls: type[T], data: dict, *, key: str = "") -> T:
    """Builds a (nested) frozen config dataclass from plain data, as ``dataclasses.asdict`` or JSON gives it.

    Values are checked against the field types (``int``, ``float``, ``str``, ``bool``, ``Literal``, tuples, unions
    with ``None``, nested dataclasses); an integral float reads as an ``int`` (``1e6`` samples). Errors name the
    dotted key, e.g. ``optim.lr: 'fast' is not a float``; a section's own ``__post_init__`` check is reported
    under its key too. That constructor call is the one validation hook: a section validates itself there.

    Args:
        cls: the dataclass to build.
        data: field name -> plain value (missing fields keep their defaults).
        key: the dotted path of ``data`` in the whole config (for messages).

    Returns:
        A ``cls`` instance.

    Raises:
        ConfigError: (a ``ValueError``) an unknown field, a value of the wrong type, or a section's own check.

    Example:
        >>> @dataclasses.dataclass(frozen=True, kw_only=True)
        ... class Optim:
        ...     lr: float = 0.1
        ...     betas: tuple[float, float] = (0.9, 0.99)
        >>> from_dict(Optim, {"lr": 1, "betas": [0.9, 0.95]})
        Optim(lr=1.0, betas=(0.9, 0.95))
        >>> from_dict(Optim, {"lr": "fast"}, key="optim")
        Traceback (most recent call last):
        ...
        advtrain.training._config.ConfigError: optim.lr: 'fast' is not a float
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{key or cls.__name__}: {data!r} is not a section (a dict of {cls.__name__} fields)")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields{f' in {key}' if key else ''}: {unknown} (have {names})")
    kwargs = {n: _coerce(hints[n], data[n], f"{key}.{n}" if key else n) for n in names if n in data}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        field = getattr(err, "field", None)  # a FieldError from the section's validators: prefix its dotted key
        if field is not None and key:
            raise ConfigError(f"{key}.{field}: {err.detail}") from None
        raise ConfigError(str(err)) from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key}: {err}" if key else str(err)) from None


def load_config(cls: type[T], path: str | Path) -> T:
    """Reads a config saved as JSON (``config.json`` of a run directory) back into ``cls``."""
    return from_dict(cls, json.loads(Path(path).read_text()))


def override(cfg: T, items: list[str]) -> T:
    """Applies ``dotted.key=value`` overrides to a config dataclass (values parsed as JSON, else kept as strings).

    ``stages.1.samples=1000`` indexes a tuple of sections; ``stages=[...]`` replaces it whole.

    Args:
        cfg: a config dataclass instance.
        items: ``"key=value"`` strings, applied in order.

    Returns:
        A new config of the same type.

    Raises:
        ConfigError: a malformed item, an unknown key, or a value of the wrong type (the key and value named).

    Example:
        >>> @dataclasses.dataclass(frozen=True, kw_only=True)
        ... class Optim:
        ...     lr: float = 0.1
        ...     milestones: tuple[int, ...] = (30, 60)
        >>> override(Optim(), ["lr=0.01", "milestones.1=80"])
        Optim(lr=0.01, milestones=(30, 80))
        >>> override(Optim(), ["lr=fast"])
        Traceback (most recent call last):
        ...
        advtrain.training._config.ConfigError: lr: 'fast' is not a float
    """
    data = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples become lists, so stages.N indexes work
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node, parts = data, key.split(".")
        for i, p in enumerate(parts):
            where = ".".join(parts[:i]) or "the config"
            if isinstance(node, list):
                if not p.isdigit() or int(p) >= len(node):
                    raise ConfigError(f"override {key!r}: {where} has no item {p!r} (it has {len(node)})")
                p = int(p)
            elif not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {where} is {node!r}, not a section")
            elif p not in node:
                raise ConfigError(f"override {key!r}: no field {p!r} in {where} (have {sorted(node)})")
            if i == len(parts) - 1:
                node[p] = value
            elif node[p] is None:
                raise ConfigError(f"override {key!r}: {'.'.join(parts[: i + 1])} is None here; set it whole first")
            else:
                node = node[p]
    return from_dict(type(cfg), data)


def _same_path(a: Any, b: Any) -> bool:
    """Two strings naming one existing file or folder (one relative, one absolute, say)."""
    import os

    try:
        return isinstance(a, str) and isinstance(b, str) and os.path.exists(a) and os.path.samefile(a, b)
    except OSError:
        return False


def _diff(a: Any, b: Any, key: str, out: list[str], missing_ok: bool) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            sub = f"{key}.{k}" if key else str(k)
            if k in a and k in b:
                _diff(a[k], b[k], sub, out, missing_ok)
            elif not missing_ok:
                out.append(
                    f"{sub} {json.dumps(a[k]) if k in a else '(absent)'} -> "
                    f"{json.dumps(b[k]) if k in b else '(absent)'}"
                )
    elif (
        isinstance(a, list)
        and isinstance(b, list)
        and len(a) == len(b)
        and any(isinstance(v, (dict, list)) for v in a + b)
    ):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{key}.{i}", out, missing_ok)
    elif a != b and not _same_path(a, b):
        out.append(f"{key} {json.dumps(a)} -> {json.dumps(b)}")


def config_diff(old: dict, new: dict, *, ignore: tuple[str, ...] = (), missing_ok: bool = False) -> list[str]:
    """The fields where two configs (as plain data) differ, as ``"dotted.key old -> new"`` strings.

    Args:
        old, new: configs as plain data (``dataclasses.asdict``, or a saved ``config.json``).
        ignore: dotted keys (or sections) left out of the comparison.
        missing_ok: leave out fields that only one side has (a config saved by an older version of the code).

    Strings that name the same existing file or folder (a relative and an absolute path) are equal.

    Example:
        >>> config_diff({"optim": {"lr": 0.001}, "data": {"batch_size": 64}},
        ...             {"optim": {"lr": 0.002}, "data": {"batch_size": 32}})
        ['data.batch_size 64 -> 32', 'optim.lr 0.001 -> 0.002']
    """
    out: list[str] = []
    _diff(json.loads(json.dumps(old)), json.loads(json.dumps(new)), "", out, missing_ok)
    return [d for d in out if not any(d.split(" ", 1)[0] == i or d.startswith(i + ".") for i in ignore)]


def precision_for_device(precision: str, *, device_type: str, explicit: bool) -> tuple[str, str | None]:
    """The precision a run should use on ``device_type``, and a one-line notice when it differs or costs.

    bf16 autocast pays off on GPUs; on a CPU without bf16 matrix units it is an order of magnitude slower (a
    vit_tiny on 224 px Imagenette: 7 img/s in bf16 against 142 img/s in fp32, issue 21). So a preset's bf16 falls
    back to fp32 on CPU, unless the user asked for bf16 on the command line (``explicit``): then it is kept, with
    a warning of the cost.

    Args:
        precision: the config's ``run.precision`` (``"fp32"`` or ``"bf16"``).
        device_type: ``"cuda"``, ``"cpu"``, ``"mps"``.
        explicit: the user set ``run.precision`` themselves (an override), rather than keeping the preset's.

    Returns:
        ``(precision, notice)``; ``notice`` is None when nothing needs saying.

    Example:
        >>> precision_for_device("bf16", device_type="cpu", explicit=False)[0]
        'fp32'
        >>> precision_for_device("bf16", device_type="cuda", explicit=False)
        ('bf16', None)
    """
    if precision != "bf16" or device_type != "cpu":
        return precision, None
    if explicit:
        return "bf16", (
            "warning: run.precision=bf16 on CPU as asked: bf16 autocast is usually many times slower "
            "than fp32 on CPUs (issue 21: 7 vs 142 img/s for a vit_tiny)"
        )
    return "fp32", (
        "notice: running on CPU, so run.precision falls back from the preset's bf16 to fp32 (bf16 is "
        "many times slower on CPUs); set run.precision=bf16 to keep it"
    )
