"""One robustness protocol for the command and both recipes: clean top-1, PGD-K and AutoAttack per norm and radius.

Strict float32, per-sample results written as they are computed, resumable, and gathered across ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from advtrain.attacks import pgd
from advtrain.eval._autoattack import _AA_ATTACKS, autoattack
from advtrain.eval._robust import eval_mode

NORMS = ("linf", "l2", "l1")
AA_VERSIONS = ("standard", "plus", "rand")


def eps_label(norm: str, eps: float) -> str:
    """A readable radius: ``4/255`` for l_inf multiples of 1/255, else the shortest float (``2``, ``75``, ``0.3``).

    Example:
        >>> eps_label("linf", 4 / 255), eps_label("l2", 2.0), eps_label("linf", 0.3)
        ('4/255', '2', '0.3')
    """
    k = eps * 255
    if norm == "linf" and abs(k - round(k)) < 1e-6 and round(k) >= 1:
        return f"{round(k)}/255"
    return f"{eps:g}"


def max_sensible_eps(norm: str, dim: int) -> float:
    r"""The largest radius that still means something on ``dim``-dimensional images in [0, 1].

    Beyond :math:`\tfrac12` (l_inf), :math:`\tfrac12\sqrt d` (l_2) or :math:`\tfrac d2` (l_1) the ball around any
    image in the box holds the uniform-gray image, so every classifier has zero robust accuracy by definition:
    such a radius is a units mistake (``4`` for ``4/255``).

    Example:
        >>> max_sensible_eps("linf", 3 * 224 * 224), round(max_sensible_eps("l2", 3 * 224 * 224), 1)
        (0.5, 194.0)
    """
    match norm:
        case "linf":
            return 0.5
        case "l2":
            return 0.5 * math.sqrt(dim)
        case "l1":
            return 0.5 * dim
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")


class AttackSpec(NamedTuple):
    """One attack of a protocol: its result name, kind, norm, radius and settings."""

    name: str  # e.g. "pgd20-linf-4/255", "autoattack-l2-2"
    kind: str  # "pgd" or "autoattack"
    norm: str
    eps: float
    steps: int | None  # PGD steps
    step_size: float | None  # PGD step, absolute (eps * pgd_rel_step)
    version: str | None  # AutoAttack version ("standard", ..., "custom")
    attacks: tuple[str, ...] | None  # AutoAttack's attack list with version "custom"


@dataclass(frozen=True, kw_only=True)
class EvalProtocol:
    """What a robustness evaluation measures; validated on construction, serializable with :meth:`to_dict`.

    RobustBench's ImageNet protocol is ``EvalProtocol(eps=IMAGENET_EPS, pgd_steps=0, autoattack="standard")``;
    AdvXL's Table 3 adds PGD-20 with step ``eps / 4`` (``pgd_steps=20, pgd_rel_step=0.25``).
    """

    eps: Mapping[str, float | Sequence[float]]  # norm -> radius or radii, pixels in [0, 1] (l_inf 4/255, l_2 2, l_1 75)
    pgd_steps: int  # PGD iterations per attack; 0: no PGD
    pgd_rel_step: float | None = None  # PGD step size as a fraction of eps (AdvXL: 1/255 at 4/255 = 0.25)
    autoattack: str | Sequence[str] | None = "standard"  # a version, a custom list of attacks, or None: none
    seed: int = 0  # PGD random starts and AutoAttack's seed

    def __post_init__(self):
        if not isinstance(self.eps, Mapping) or not self.eps:
            raise ValueError(f"eps must map norms to radii, e.g. {{'linf': 4/255}}; got {self.eps!r}")
        eps = {}
        for norm, radii in self.eps.items():
            if norm not in NORMS:
                raise ValueError(f"unknown norm {norm!r} in eps; expected some of {NORMS}")
            radii = (radii,) if isinstance(radii, (int, float)) else tuple(radii)
            if not radii:
                raise ValueError(f"eps[{norm!r}] holds no radius")
            for e in radii:
                if isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e) or e <= 0:
                    raise ValueError(f"eps for {norm} must be finite numbers > 0; got {e!r}")
                if norm == "linf" and e > 0.5:
                    raise ValueError(
                        f"eps {e:g} for linf is above 0.5, where the ball holds the gray image of every "
                        f"input in [0, 1]: pixels are in [0, 1] (did you mean {e:g}/255?)"
                    )
            if len(set(radii)) != len(radii):
                raise ValueError(f"eps[{norm!r}] repeats a radius: {radii}")
            eps[norm] = tuple(float(e) for e in radii)
        object.__setattr__(self, "eps", eps)
        if isinstance(self.pgd_steps, bool) or not isinstance(self.pgd_steps, int) or self.pgd_steps < 0:
            raise ValueError(f"pgd_steps must be an int >= 0; got {self.pgd_steps!r}")
        if self.pgd_steps and (not isinstance(self.pgd_rel_step, (int, float)) or not 0 < self.pgd_rel_step <= 10):
            raise ValueError(
                f"pgd_rel_step (the step as a fraction of eps) must be in (0, 10] with PGD; got {self.pgd_rel_step!r}"
            )
        aa = self.autoattack
        if aa is not None and not isinstance(aa, str):
            aa = tuple(aa)
            if not aa or any(a not in _AA_ATTACKS for a in aa) or len(set(aa)) != len(aa):
                raise ValueError(f"a custom AutoAttack list takes distinct names from {_AA_ATTACKS}; got {list(aa)}")
            object.__setattr__(self, "autoattack", aa)
        elif isinstance(aa, str) and aa not in AA_VERSIONS:
            raise ValueError(f"autoattack must be one of {AA_VERSIONS}, a list of attacks or None; got {aa!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int; got {self.seed!r}")

    @property
    def attacks(self) -> tuple[AttackSpec, ...]:
        """Every attack, norm by norm and radius by radius: PGD-K first, then AutoAttack."""
        out = []
        for norm, radii in self.eps.items():
            for e in radii:
                if self.pgd_steps:
                    out.append(
                        AttackSpec(
                            f"pgd{self.pgd_steps}-{norm}-{eps_label(norm, e)}",
                            "pgd",
                            norm,
                            e,
                            self.pgd_steps,
                            e * self.pgd_rel_step,
                            None,
                            None,
                        )
                    )
                if self.autoattack is not None:
                    custom = not isinstance(self.autoattack, str)
                    out.append(
                        AttackSpec(
                            f"autoattack-{norm}-{eps_label(norm, e)}",
                            "autoattack",
                            norm,
                            e,
                            None,
                            None,
                            "custom" if custom else self.autoattack,
                            tuple(self.autoattack) if custom else None,
                        )
                    )
        return tuple(out)

    def check_input(self, shape: Sequence[int]) -> None:
        """Raises ``ValueError`` for a radius beyond :func:`max_sensible_eps` on images of ``(C, H, W)`` ``shape``."""
        dim = math.prod(shape)
        for norm, radii in self.eps.items():
            top = max_sensible_eps(norm, dim)
            for e in radii:
                if e > top:
                    raise ValueError(
                        f"eps {e:g} for {norm} is above {top:g} on {tuple(shape)} images "
                        f"({dim} values in [0, 1]): there the ball holds the gray image of every input"
                    )

    def to_dict(self) -> dict:
        """Plain JSON types, the attacks spelled out."""
        d = dataclasses.asdict(self)
        d["eps"] = {k: list(v) for k, v in self.eps.items()}
        d["autoattack"] = self.autoattack if isinstance(self.autoattack, (str, type(None))) else list(self.autoattack)
        d["attacks"] = [a._asdict() | {"attacks": list(a.attacks) if a.attacks else None} for a in self.attacks]
        return d


# ------------------------------------------------------------------------------------------------ float32


@contextlib.contextmanager
def strict_float32():
    """Autocast off (CPU and CUDA, even inside an outer ``torch.autocast``) and no TF32 in matmuls/convolutions.

    The flags are restored on exit.
    """
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _check_float32(model: Any) -> None:
    if not isinstance(model, nn.Module):
        return
    other = sorted(
        {
            str(t.dtype)
            for t in [*model.parameters(), *model.buffers()]
            if t.is_floating_point() and t.dtype != torch.float32
        }
    )
    if other:
        raise ValueError(f"robust evaluation runs in float32; the model holds {other} tensors: pass model.float()")


# ------------------------------------------------------------------------------------------------ sample log


def read_sample_log(paths: Iterable[str | Path]) -> dict[str, dict]:
    """The per-sample records of one or more JSON-lines files, by key (later files win; a cut last line is skipped).

    Raises:
        ValueError: a malformed line that is not the last one of its file.
    """
    out: dict[str, dict] = {}
    for path in paths:
        path = Path(path)
        if not path.exists():
            continue
        lines = path.read_text().split("\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:  # cut off mid-write by a kill: that sample is redone
                    continue
                raise ValueError(f"{path}:{i + 1} is not a JSON line: {line[:80]!r}") from None
            out[str(rec["key"])] = rec
    return out


class SampleLog:
    """Appends one JSON line per sample and flushes (and fsyncs) after each batch; repairs a cut last line first."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            raw = self.path.read_bytes()
            if raw and not raw.endswith(b"\n"):  # a kill mid-write: drop the partial line
                with open(self.path, "r+b") as f:
                    f.truncate(raw.rfind(b"\n") + 1)
        self._f = open(self.path, "a")

    def write(self, records: Iterable[dict]) -> None:
        for r in records:
            self._f.write(json.dumps(r) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


# ------------------------------------------------------------------------------------------------ report


def wilson_interval(k: int, n: int, *, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion ``k / n`` (95 % at ``z = 1.96``).

    Example:
        >>> tuple(round(v, 3) for v in wilson_interval(50, 100))
        (0.404, 0.596)
    """
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    c = z * z / n
    mid = (p + c / 2) / (1 + c)
    half = z * math.sqrt(p * (1 - p) / n + c / (4 * n)) / (1 + c)
    return (max(0.0, mid - half), min(1.0, mid + half))


class RobustReport(NamedTuple):
    """Counts over ``n`` samples: clean top-1 and, per attack, robust top-1 (correct clean and attacked)."""

    n: int
    counts: dict[str, int]  # "clean" and each attack name -> correctly classified samples
    attacks: tuple[AttackSpec, ...]
    seconds: float  # wall time of this call (resumed samples not included)
    resumed: int  # samples taken from earlier results
    nonfinite: int  # samples whose clean logits were not finite (counted wrong)

    @property
    def clean(self) -> float:
        return self.counts["clean"] / self.n

    @property
    def robust(self) -> dict[str, float]:
        return {a.name: self.counts[a.name] / self.n for a in self.attacks}

    def table(self) -> str:
        """A markdown table: one row for clean and one per attack, accuracy in percent with a 95 % interval."""
        lines = ["| attack | norm | eps | accuracy (%) | 95% CI | correct / n |", "|---|---|---|---|---|---|"]
        rows = [("clean", "-", "-", self.counts["clean"])]
        for a in self.attacks:
            label = (
                f"PGD-{a.steps}"
                if a.kind == "pgd"
                else (f"AutoAttack ({a.version})" if a.version != "custom" else f"AutoAttack ({'+'.join(a.attacks)})")
            )
            rows.append((label, a.norm, eps_label(a.norm, a.eps), self.counts[a.name]))
        for label, norm, eps, k in rows:
            lo, hi = wilson_interval(k, self.n)
            lines.append(
                f"| {label} | {norm} | {eps} | {100 * k / self.n:.2f} | {100 * lo:.1f}-{100 * hi:.1f} "
                f"| {k} / {self.n} |"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "clean": self.clean,
            "robust": self.robust,
            "counts": dict(self.counts),
            "attacks": [a._asdict() | {"attacks": list(a.attacks) if a.attacks else None} for a in self.attacks],
            "seconds": self.seconds,
            "resumed": self.resumed,
            "nonfinite_clean": self.nonfinite,
        }


def report_from_records(
    records: Mapping[str, dict], attacks: Sequence[AttackSpec], *, seconds: float = 0.0, resumed: int = 0
) -> RobustReport:
    """Counts the per-sample records (``{"key", "label", "clean", <attack name>: bool, ...}``).

    Raises:
        ValueError: no records, or a record without a result for one of ``attacks`` (another protocol's file).
    """
    if not records:
        raise ValueError("no samples were evaluated")
    counts = {"clean": 0} | {a.name: 0 for a in attacks}
    nonfinite = 0
    for key, r in records.items():
        missing = [k for k in counts if k not in r]
        if missing:
            raise ValueError(
                f"the record of sample {key!r} has no result for {missing}: was it written by another protocol?"
            )
        for k in counts:
            counts[k] += bool(r[k])
        nonfinite += bool(r.get("nonfinite", False))
    return RobustReport(len(records), counts, tuple(attacks), seconds, resumed, nonfinite)


# ------------------------------------------------------------------------------------------------ evaluation


def _stable_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b("\x00".join(map(str, parts)).encode(), digest_size=8).digest(), "big") >> 1


def _unpack(batch: Any, offset: int, prefix: str) -> tuple[Tensor, Tensor, list[str]]:
    if isinstance(batch, Mapping):
        x, y, keys = batch["image"], batch["label"], batch.get("key")
    else:
        x, y = batch[0], batch[1]
        keys = batch[2] if len(batch) > 2 else None
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise ValueError(f"each batch needs (B, C, H, W) images; got {getattr(x, 'shape', type(x).__name__)}")
    y = torch.as_tensor(y)
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must be (B,) = ({x.shape[0]},); got {tuple(y.shape)}")
    if keys is None:
        keys = [f"{prefix}{offset + i}" for i in range(x.shape[0])]
    keys = [str(k) for k in keys]
    if len(keys) != x.shape[0]:
        raise ValueError(f"a batch of {x.shape[0]} images has {len(keys)} keys")
    return x, y, keys


def _to_unit_float(x: Tensor, device) -> Tensor:
    if device is not None:
        x = x.to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        return x.float().div_(255)
    if not x.is_floating_point():
        raise ValueError(f"images must be uint8 or floating; got {x.dtype}")
    x = x.float()
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise ValueError(f"images must be in [0, 1] (normalization belongs inside the model); got [{lo:.3g}, {hi:.3g}]")
    return x


def _in_ball(x_adv: Tensor, x: Tensor, spec: AttackSpec) -> None:
    d = (x_adv - x).flatten(1)
    size = {"linf": lambda: d.abs().amax(1), "l2": lambda: d.norm(dim=1), "l1": lambda: d.abs().sum(1)}[spec.norm]()
    bad = (size > spec.eps * (1 + 1e-4) + 1e-6) | (x_adv.flatten(1).amin(1) < 0) | (x_adv.flatten(1).amax(1) > 1)
    if bool(bad.any()):
        raise RuntimeError(
            f"{spec.name} returned {int(bad.sum())} points outside the {spec.norm} ball of radius "
            f"{spec.eps:g} or the [0, 1] box (largest {spec.norm} size {float(size.max()):.6g})"
        )


def _attack_fn(spec: AttackSpec, *, seed: int, keys: Sequence[str], device: torch.device):
    if spec.kind == "pgd":
        g = torch.Generator(device=device).manual_seed(_stable_seed(seed, spec.name, keys[0], len(keys)))
        return functools.partial(
            pgd,
            eps=spec.eps,
            step_size=spec.step_size,
            steps=spec.steps,
            norm=spec.norm,
            random_start=True,
            generator=g,
        )
    return functools.partial(
        autoattack,
        norm=spec.norm,
        eps=spec.eps,
        version=spec.version,
        attacks=list(spec.attacks) if spec.attacks else None,
        seed=seed,
    )


def _correct(model, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, int]:
    with torch.no_grad():
        logits = model(x)
    if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(f"the model must return (B, K) logits; got {tuple(logits.shape)} for {tuple(x.shape)} images")
    finite = torch.isfinite(logits).all(1)
    return (logits.argmax(1) == y) & finite, finite, int(logits.shape[1])


def robust_eval(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    protocol: EvalProtocol,
    num_classes: int | None = None,
    results: str | Path | None = None,
    done: Mapping[str, dict] | None = None,
    device: torch.device | str | None = None,
    total: int | None = None,
    progress: bool = True,
    log_every: int | None = None,
    desc: str = "robust eval",
    gather: bool = True,
) -> RobustReport:
    r"""Clean top-1 and robust top-1 under every attack of ``protocol``, per sample, in strict float32.

    For each batch: the model classifies the clean images; each attack (:attr:`EvalProtocol.attacks`) runs on
    the correctly classified ones, and a sample counts as robust if the attacked image is still classified
    correctly (the RobustBench / AutoAttack convention). AutoAttack sees exactly the batch's correct samples, in
    one call (``pyautoattack``'s ``run_standard_evaluation`` with the batch as its batch), so a single batch gives
    the same per-sample result as ``AutoAttack(...).run_standard_evaluation(x, y)`` on the same images and seed;
    AutoAttack's results depend on how samples are batched, as in RobustBench. PGD's random start comes from a
    generator seeded by ``(seed, attack, first key of the batch, batch size)``.

    Everything runs with autocast off, TF32 off and the model in eval mode (modes restored), whatever the
    caller's context. Attacked images are checked to lie in the ball and the box.

    Per-sample records ``{"key", "label", "clean", <attack name>: bool..., "nonfinite"}`` are appended to
    ``results`` (JSON lines) after each batch; samples whose key is in ``done`` (earlier records, e.g.
    :func:`read_sample_log` of the same file) are skipped and counted from their records: that is resuming.
    Under ``torch.distributed`` with ``gather=True``, every rank's records are gathered (duplicates by key,
    such as a ``DistributedSampler``'s padding, count once) and every rank returns the same global report.

    Args:
        model: maps ``(B, C, H, W)`` pixels in [0, 1] to ``(B, K)`` logits, normalization inside; float32.
        batches: yields ``(x, y)`` or ``(x, y, keys)`` tuples or ``{"image", "label", "key"}`` dicts; ``x``
            uint8 (divided by 255) or floats in [0, 1], ``y`` int labels, ``keys`` unique sample names (default:
            running indices, which resume correctly only if the order is fixed).
        protocol: the attacks (:class:`EvalProtocol`).
        num_classes: the data's class count; the model's ``K`` must equal it (checked before any attack).
        results: a JSON-lines file to append per-sample records to (``None``: keep them in memory only).
        done: records of samples already evaluated (by key).
        device: moves each batch there (default: leave it where it is).
        total: the number of samples this call evaluates (``done`` excluded), for the progress bar.
        progress: show a tqdm bar with the running accuracies.
        log_every: also print a summary line every this many batches (SLURM logs).
        desc: the bar's label.
        gather: under ``torch.distributed``, gather the records of all ranks.

    Returns:
        A :class:`RobustReport` over the evaluated and the ``done`` samples.

    Raises:
        ValueError: a model with non-float32 tensors, a class count that differs from ``num_classes``, a label
            outside ``[0, K)``, images outside [0, 1] or a radius beyond :func:`max_sensible_eps` for their size
            (all before the first attack), repeated keys, or no samples at all.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> data = [(torch.rand(8, 3, 2, 2), torch.randint(0, 3, (8,)))]
        >>> p = EvalProtocol(eps={"linf": 4 / 255, "l2": 0.5}, pgd_steps=3, pgd_rel_step=0.5, autoattack=None)
        >>> r = robust_eval(model, data, protocol=p, progress=False)
        >>> r.n, sorted(r.counts)
        (8, ['clean', 'pgd3-l2-0.5', 'pgd3-linf-4/255'])

    References:
        Croce & Hein, arXiv 2003.01690 (AutoAttack); Croce et al., arXiv 2010.09670 (RobustBench);
        Wang et al., arXiv 2401.04727 (AdvXL: l_inf 4/255, l_2 2, l_1 75 on ImageNet).
    """
    if not isinstance(protocol, EvalProtocol):
        raise TypeError(f"protocol must be an EvalProtocol; got {type(protocol).__name__}")
    _check_float32(model)
    specs = protocol.attacks
    done = {str(k): v for k, v in (done or {}).items()}
    records: dict[str, dict] = {}
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if dist else 0
    log = SampleLog(results) if results is not None else None
    start = time.perf_counter()
    counts = {"clean": 0} | {a.name: 0 for a in specs}
    for r in done.values():
        for k in counts:
            counts[k] += bool(r.get(k, False))
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    checked, offset = False, 0
    try:
        with eval_mode(model), strict_float32():
            for i, batch in enumerate(batches):
                x, y, keys = _unpack(batch, offset, f"{rank}/" if dist else "")
                offset += len(keys)
                if len(set(keys)) != len(keys):
                    raise ValueError(f"a batch repeats keys: {sorted({k for k in keys if keys.count(k) > 1})[:5]}")
                keep = [j for j, k in enumerate(keys) if k not in done and k not in records]
                if not keep:
                    continue
                if len(keep) < len(keys):
                    idx = torch.tensor(keep)
                    x, y, keys = x[idx], y[idx], [keys[j] for j in keep]
                x = _to_unit_float(x, device)
                y = y.to(x.device, torch.int64)
                ok, finite, classes = _correct(model, x, y)
                if not checked:
                    if num_classes is not None and classes != num_classes:
                        raise ValueError(f"the model has {classes} outputs but the data has {num_classes} classes")
                    protocol.check_input(tuple(x.shape[1:]))
                    checked = True
                if int(y.min()) < 0 or int(y.max()) >= classes:
                    raise ValueError(
                        f"labels must be in [0, {classes}) for a {classes}-way model; got "
                        f"[{int(y.min())}, {int(y.max())}]"
                    )
                flags = {"clean": ok}
                for spec in specs:
                    flags[spec.name] = _robust(model, spec, x, y, ok, seed=protocol.seed, keys=keys)
                batch_records = []
                for j, k in enumerate(keys):
                    rec = {"key": k, "label": int(y[j])} | {n: bool(f[j]) for n, f in flags.items()}
                    rec["nonfinite"] = not bool(finite[j])
                    batch_records.append(rec)
                    records[k] = rec
                for n, f in flags.items():
                    counts[n] += int(f.sum())
                if log is not None:
                    log.write(batch_records)
                bar.update(len(keys))
                seen = len(done) + len(records)
                summary = {n: f"{100 * c / seen:.1f}" for n, c in counts.items()}
                bar.set_postfix(summary)
                if log_every and (i + 1) % log_every == 0:
                    bar.write(f"[{desc}] {seen} samples: " + ", ".join(f"{k} {v}%" for k, v in summary.items()))
    finally:
        bar.close()
        if log is not None:
            log.close()
    resumed = len(done)
    allrecs = dict(done)
    if dist and gather:
        mine = list(records.values())
        parts: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, mine)
        for part in parts:
            for rec in part:
                allrecs.setdefault(str(rec["key"]), rec)
    else:
        allrecs.update(records)
    return report_from_records(allrecs, specs, seconds=time.perf_counter() - start, resumed=resumed)


def _robust(model, spec: AttackSpec, x: Tensor, y: Tensor, ok: Tensor, *, seed: int, keys: Sequence[str]) -> Tensor:
    out = torch.zeros_like(ok)
    if not bool(ok.any()):
        return out
    x_ok, y_ok = x[ok], y[ok]
    attack = _attack_fn(spec, seed=seed, keys=keys, device=x.device)
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # pyautoattack seeds the global generators: keep the caller's
        x_adv = attack(model, x_ok, y_ok)
    _in_ball(x_adv, x_ok, spec)
    adv_ok, _, _ = _correct(model, x_adv, y_ok)
    out[ok] = adv_ok
    return out


# ------------------------------------------------------------------------------------------------ recipes


def _selected(batches: Iterable[Any], keep: Sequence[int] | None, labels: dict[int, int], *, rank: int, world: int):
    """Yields ``(x, y, keys)`` of this rank's share of the samples at positions ``keep`` (all: ``None``).

    Keys are positions in the batches' order; every rank reads every batch (so ``labels`` records them all) and
    keeps every ``world``-th selected sample. A position whose label differs from the one ``labels`` holds
    means the batches changed order between passes: that raises instead of attacking other images.
    """
    share = None if keep is None else {i: j % world == rank for j, i in enumerate(keep)}
    pos = 0
    for b in batches:
        x, y = b[0], torch.as_tensor(b[1])
        idx = []
        for j, lab in enumerate(y.tolist()):
            i = pos + j
            if labels.setdefault(i, int(lab)) != int(lab):
                raise ValueError(
                    f"validation sample {i} has label {int(lab)} now and {labels[i]} before: the "
                    f"validation batches must come in the same order on every pass"
                )
            if (i % world == rank) if share is None else share.get(i, False):
                idx.append(j)
        if idx:
            t = torch.tensor(idx)
            yield x[t.to(x.device)], y[t], [str(pos + j) for j in idx]
        pos += len(y)


def recipe_eval(
    model: nn.Module,
    batches,
    *,
    norms: Sequence[str],
    eps: Mapping[str, float],
    pgd_steps: int,
    pgd_step_size: float,
    autoattack_samples: int,
    seed: int,
    results: str | Path | None,
    progress: bool = False,
    desc: str = "eval",
    distributed: bool = True,
) -> dict:
    r"""The recipes' end-of-stage evaluation: :func:`robust_eval` (strict float32) as a flat metrics dict.

    Clean top-1 and PGD-``pgd_steps`` (step ``pgd_step_size`` at the l_inf radius, scaled with the radius for
    the other norms) run on every validation sample; AutoAttack (standard) on a seeded class-stratified subset
    of ``autoattack_samples`` of them (:func:`stratified_subset` of their labels), not the first ones in loader
    order. Under ``torch.distributed`` every rank reads every batch and attacks its share; the reports are global.

    Args:
        model: float32 classifier of pixels in [0, 1].
        batches: a callable returning an iterable of ``(x, y, ...)`` batches in a fixed order (called once per pass).
        norms: the norms to attack, e.g. ``("linf",)``; the first one's results keep the short keys.
        eps: radius per norm (only those in ``norms`` are used).
        pgd_steps: PGD iterations (0: none). pgd_step_size: the PGD step at ``eps[norms[0]]``.
        autoattack_samples: AutoAttack subset size (0: none). seed: PGD/AutoAttack and subset seed.
        results: the per-sample JSON-lines file (the AutoAttack pass writes ``<stem>-autoattack.jsonl``; ranks
            other than 0 add ``.rank<r>``); an existing file is replaced. ``None``: in memory only.
        distributed: under ``torch.distributed``, share the work among the ranks (every rank must call);
            ``False``: this process evaluates everything alone (e.g. rank 0 only).

    Returns:
        ``{"clean", "n", "pgd<K>", "autoattack", "autoattack_n"}`` for the first norm (keys present only when that
        attack runs), ``"pgd<K>-<norm>"`` / ``"autoattack-<norm>"`` for the others.

    Raises:
        ValueError: a norm outside :data:`NORMS` or without a radius, batches whose labels change between the two
            passes (another order), or what :func:`robust_eval` raises.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> data = [(torch.rand(8, 3, 2, 2), torch.randint(0, 3, (8,)))]
        >>> out = recipe_eval(model, lambda: data, norms=("linf", "l2"), eps={"linf": 4 / 255, "l2": 0.5},
        ...                   pgd_steps=2, pgd_step_size=1 / 255, autoattack_samples=0, seed=0, results=None)
        >>> sorted(out)
        ['clean', 'n', 'pgd2', 'pgd2-l2']
    """
    from advtrain.eval._subset import stratified_subset

    bad = [n for n in norms if n not in NORMS or n not in eps] or ([] if norms else ["(none)"])
    if bad:
        raise ValueError(f"eval norms must be some of {NORMS}, each with a radius; got {list(norms)} (eps {dict(eps)})")
    dist = distributed and torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist else (0, 1)
    radii = {n: eps[n] for n in norms}
    rel = pgd_step_size / radii[norms[0]] if pgd_steps else None

    def path(suffix: str) -> Path | None:
        if results is None:
            return None
        p = Path(results)
        p = p.with_name(p.stem + suffix + (f".rank{rank}" if rank else "") + p.suffix)
        p.unlink(missing_ok=True)
        return p

    def short(name: str, prefix: str) -> str:
        return (
            prefix
            if name.endswith(f"-{norms[0]}-{eps_label(norms[0], radii[norms[0]])}")
            else (f"{prefix}-{name.split('-')[1]}")
        )

    labels: dict[int, int] = {}
    r = robust_eval(
        model,
        _selected(batches(), None, labels, rank=rank, world=world),
        progress=progress,
        desc=desc,
        protocol=EvalProtocol(eps=radii, pgd_steps=pgd_steps, pgd_rel_step=rel, autoattack=None, seed=seed),
        results=path(""),
        gather=dist,
    )
    out = {"clean": r.clean, "n": r.n} | {short(k, f"pgd{pgd_steps}"): v for k, v in r.robust.items()}
    if autoattack_samples:
        pos = sorted(labels)
        keep = stratified_subset([str(i) for i in pos], [labels[i] for i in pos], n=autoattack_samples, seed=seed)
        ra = robust_eval(
            model,
            _selected(batches(), [pos[i] for i in keep], labels, rank=rank, world=world),
            protocol=EvalProtocol(eps=radii, pgd_steps=0, autoattack="standard", seed=seed),
            results=path("-autoattack"),
            progress=progress,
            desc="autoattack",
            gather=dist,
        )
        out |= {short(k, "autoattack"): v for k, v in ra.robust.items()} | {"autoattack_n": ra.n}
    return out
