"""Clean and robust accuracy over a data loader, with a progress bar and a per-batch summary."""

from __future__ import annotations

import numbers
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from advtrain.attacks import NonFiniteWarning

AttackFn = Callable[[Callable[[Tensor], Tensor], Tensor, Tensor], Tensor]

#: The (images, labels) key pairs a dict batch may use, tried in this order.
BATCH_KEYS: tuple[tuple[str, str], ...] = (
    ("image", "label"),
    ("images", "labels"),
    ("img", "label"),
    ("imgs", "labels"),
    ("pixel_values", "labels"),
    ("input", "target"),
    ("inputs", "targets"),
    ("x", "y"),
    ("jpg", "cls"),
)


class EvalReport(NamedTuple):
    """Accuracies over ``n`` samples: ``clean`` and one robust accuracy per attack, in [0, 1].

    ``nonfinite`` counts, per metric (``"clean"`` and each attack name), the samples whose logits held a NaN or
    an inf (or, under an attack, whose adversarial image did): they count as wrong. Empty for reports built by
    hand without it.
    """

    n: int
    clean: float
    robust: dict[str, float]
    seconds: float
    nonfinite: Mapping[str, int] = MappingProxyType({})

    def table(self) -> str:
        """A small markdown table of the accuracies in percent and the non-finite counts."""
        rows = [("clean", self.clean)] + list(self.robust.items())
        lines = ["| metric | accuracy (%) | non-finite |", "|---|---|---|"]
        lines += [f"| {k} | {100 * v:.2f} | {self.nonfinite.get(k, 0)} |" for k, v in rows]
        return "\n".join(lines) + f"\n\n{self.n} samples, {self.seconds:.1f} s"


@contextmanager
def eval_mode(model: Any):
    """Puts ``model`` in eval mode and restores every submodule's own mode on exit."""
    if not isinstance(model, nn.Module):
        yield model
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, t in modes:
            m.training = t


def evaluate(
    model: Callable[[Tensor], Tensor],
    loader: Iterable[Any],
    *,
    attacks: Mapping[str, AttackFn] | None = None,
    device: torch.device | str | None = None,
    max_samples: int | None = None,
    progress: bool = True,
    log_every: int | None = None,
    desc: str = "eval",
) -> EvalReport:
    r"""Clean top-1 and robust top-1 under each attack, over the batches of a loader.

    A sample counts as robust under an attack only if it is classified correctly both clean and attacked
    (the RobustBench / AutoAttack convention); the attack therefore runs only on the correctly classified
    samples of each batch. The model runs in eval mode, and every module's mode is restored afterwards.

    A prediction whose logits row holds a NaN or an inf (a diverged model, an fp16 overflow) is wrong, whatever
    its argmax, and is counted in :attr:`EvalReport.nonfinite`; under an attack, so is a sample whose adversarial
    image is not finite. A :class:`~advtrain.attacks.NonFiniteWarning` at the end says how many. Empty batches
    are skipped. Each batch costs one host sync for the clean counts and one per attack (plus the attack's own).

    Args:
        model: maps ``(B, C, H, W)`` pixels in [0, 1] to ``(B, K)`` logits (a tensor; a model returning a tuple
            or dict needs a wrapper that picks the logits).
        loader: yields ``(x, y)`` pairs (extra items are ignored) or dicts with one of the key pairs of
            :data:`BATCH_KEYS` (``("image", "label")``, ``("images", "labels")``, ...): ``x`` ``(B, ...)``
            floating pixels in [0, 1], ``y`` ``(B,)`` integer labels in ``[0, K)``.
        attacks: a dict name -> ``attack(model, x, y) -> x_adv``; e.g. the AdvXL paper's PGD-20
            ``{"pgd20": functools.partial(pgd, eps=4/255, step_size=1/255, steps=20)}``, or :func:`autoattack`.
        device: moves each batch there (default: leave batches where they are).
        max_samples: stop after this many samples (the last batch is cut), e.g. a fixed AutoAttack subset.
        progress: show a tqdm bar with running accuracies.
        log_every: also print a summary line every this many batches (useful in SLURM logs).
        desc: the bar's label.

    Returns:
        An :class:`EvalReport`.

    Raises:
        ValueError: a loader with no samples (no batches, or only empty ones); ``max_samples < 1``; a batch
            without a batch dimension (a ``Dataset`` iterated instead of a ``DataLoader``), labels whose count
            differs from the images', labels outside ``[0, K)``; a dict batch without known keys (the message
            lists its keys); logits that are not ``(B, K)``; an attack result of the wrong shape.
        TypeError: ``attacks`` that is not a dict of callables; integer (uint8) images (convert with
            ``x.float() / 255``); non-tensor images, labels, logits or attack results; floating labels.

    Example:
        >>> import functools, torch
        >>> from advtrain import pgd
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> data = [(torch.rand(8, 1, 2, 2), torch.randint(0, 2, (8,)))]
        >>> r = evaluate(model, data, attacks={"pgd": functools.partial(pgd, eps=0.1, step_size=0.05, steps=2)},
        ...              progress=False)
        >>> r.n, 0 <= r.robust["pgd"] <= r.clean, r.nonfinite
        (8, True, {'clean': 0, 'pgd': 0})
    """
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, numbers.Integral)):
        raise TypeError(f"max_samples must be an int or None; got {max_samples!r}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1; got {max_samples}")
    attacks = _check_attacks(attacks)
    n, clean, batches = 0, 0, 0
    robust = {name: 0 for name in attacks}
    nonfinite = {"clean": 0} | {name: 0 for name in attacks}
    start = time.perf_counter()
    bar = tqdm(total=max_samples, desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    with eval_mode(model):
        for i, batch in enumerate(loader):
            batches += 1
            x, y = _batch_pair(batch, i)
            if device is not None:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            _check_batch(x, y, i)
            if max_samples is not None:
                x, y = x[: max_samples - n], y[: max_samples - n]
            if x.shape[0] == 0:
                continue
            with torch.no_grad():
                logits = _logits(model(x), x.shape[0], f"model output for batch {i}")
            finite = torch.isfinite(logits).all(1)
            ok = (logits.argmax(1) == y) & finite
            counts = torch.stack([ok.sum(), (~finite).sum(), y.min().long(), y.max().long()])
            n_ok, n_bad, y_min, y_max = counts.tolist()  # the batch's one host sync for the clean pass
            if y_min < 0 or y_max >= logits.shape[1]:
                raise ValueError(
                    f"batch {i}: labels must be in [0, {logits.shape[1]}) (the logits' columns); "
                    f"got min {y_min}, max {y_max}"
                )
            clean += n_ok
            nonfinite["clean"] += n_bad
            for name, attack in attacks.items():
                r_ok, r_bad = _robust_count(model, attack, x, y, ok, n_ok, name)
                robust[name] += r_ok
                nonfinite[name] += r_bad
            n += x.shape[0]
            bar.update(x.shape[0])
            summary = {"clean": f"{100 * clean / n:.1f}"} | {k: f"{100 * v / n:.1f}" for k, v in robust.items()}
            if any(nonfinite.values()):
                summary["nonfinite"] = str(sum(nonfinite.values()))
            bar.set_postfix(summary)
            if log_every and (i + 1) % log_every == 0:
                bar.write(f"[{desc}] batch {i + 1}: {n} samples, " + ", ".join(f"{k} {v}%" for k, v in summary.items()))
            if max_samples is not None and n >= max_samples:
                break
    bar.close()
    if n == 0:
        raise ValueError(
            f"the loader yielded no samples ({batches} batches, all empty)"
            if batches
            else "the loader yielded no samples (no batches)"
        )
    if any(nonfinite.values()):
        warnings.warn(
            f"{desc}: non-finite logits (NaN/inf) counted as wrong: "
            + ", ".join(f"{k} {v}" for k, v in nonfinite.items() if v)
            + f" of {n} samples",
            NonFiniteWarning,
            stacklevel=2,
        )
    return EvalReport(n, clean / n, {k: v / n for k, v in robust.items()}, time.perf_counter() - start, nonfinite)


def _check_attacks(attacks: Any) -> dict[str, AttackFn]:
    if attacks is None:
        return {}
    if not isinstance(attacks, Mapping):
        raise TypeError(
            f"attacks must be a dict name -> attack, e.g. {{'pgd20': functools.partial(pgd, ...)}}; got "
            f"{type(attacks).__name__}" + (" (give each attack a name)" if isinstance(attacks, (list, tuple)) else "")
        )
    for name, attack in attacks.items():
        if not isinstance(name, str):
            raise TypeError(f"attack names must be strings; got {name!r}")
        if not callable(attack):
            raise TypeError(f"attacks[{name!r}] must be callable as attack(model, x, y); got {type(attack).__name__}")
    return dict(attacks)


def _batch_pair(batch: Any, i: int) -> tuple[Any, Any]:
    """``(x, y)`` of a tuple/list batch (extra items ignored) or of a dict batch with known keys."""
    if isinstance(batch, Mapping):
        for kx, ky in BATCH_KEYS:
            if kx in batch and ky in batch:
                return batch[kx], batch[ky]
        raise ValueError(
            f"batch {i} is a dict with keys {sorted(map(str, batch))}; evaluate reads (images, labels) from one of "
            f"{', '.join(f'({a!r}, {b!r})' for a, b in BATCH_KEYS)}: rename them or map the loader to (x, y) pairs"
        )
    if isinstance(batch, (tuple, list)):
        if len(batch) < 2:
            raise ValueError(f"batch {i} must be an (x, y) pair; got a {type(batch).__name__} of {len(batch)} item")
        return batch[0], batch[1]
    raise TypeError(f"batch {i} must be an (x, y) pair or a dict; got {type(batch).__name__}")


def _check_batch(x: Any, y: Any, i: int) -> None:
    """Type, dtype and shape checks of one batch; no host sync."""
    if not isinstance(x, Tensor):
        raise TypeError(f"batch {i}: images must be a torch.Tensor; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"batch {i}: images must be floating pixels in [0, 1]; got {x.dtype} (convert with x.float() / 255)"
        )
    one_label = isinstance(y, Tensor) and y.ndim == 0 or (not isinstance(y, Tensor) and isinstance(y, numbers.Integral))
    if one_label or x.ndim < 2:
        raise ValueError(
            f"batch {i}: images of shape {tuple(x.shape)} with "
            f"{'one label' if one_label else 'labels'}: a batch dimension is missing (iterate a "
            f"DataLoader, not the Dataset, or add one with x.unsqueeze(0))"
        )
    if not isinstance(y, Tensor):
        raise TypeError(f"batch {i}: labels must be a torch.Tensor of class indices; got {type(y).__name__}")
    if y.is_floating_point() or y.is_complex():
        raise TypeError(
            f"batch {i}: labels must be integer class indices; got {y.dtype} (for one-hot or soft "
            f"targets pass y.argmax(1))"
        )
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        hint = ": if x is one (C, H, W) image, a batch dimension is missing" if x.ndim == 3 else ""
        raise ValueError(
            f"batch {i}: labels must be ({x.shape[0]},) like the images' batch; got labels of shape "
            f"{tuple(y.shape)} for images of shape {tuple(x.shape)}{hint}"
        )


def _logits(out: Any, b: int, what: str) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(
            f"{what} must be a (B, K) logits tensor; got {type(out).__name__} (wrap the model to "
            f"return the logits, e.g. lambda x: model(x)[0])"
        )
    if out.ndim != 2 or out.shape[0] != b:
        raise ValueError(f"{what} must be ({b}, K) logits; got shape {tuple(out.shape)}")
    return out


def _robust_count(model, attack: AttackFn, x: Tensor, y: Tensor, ok: Tensor, n_ok: int, name: str):
    """Robust samples among the clean-correct ones, and how many of those had non-finite images or logits."""
    if n_ok == 0:
        return 0, 0
    x_ok, y_ok = x[ok], y[ok]
    x_adv = attack(model, x_ok, y_ok)
    if not isinstance(x_adv, Tensor):
        raise TypeError(f"attack {name!r} must return the adversarial images as a tensor; got {type(x_adv).__name__}")
    if x_adv.shape != x_ok.shape:
        raise ValueError(f"attack {name!r} returned shape {tuple(x_adv.shape)} for inputs {tuple(x_ok.shape)}")
    with torch.no_grad():
        logits = _logits(model(x_adv), x_ok.shape[0], f"model output under attack {name!r}")
    finite = torch.isfinite(logits).all(1) & torch.isfinite(x_adv.flatten(1)).all(1)
    r_ok, r_bad = torch.stack([((logits.argmax(1) == y_ok) & finite).sum(), (~finite).sum()]).tolist()
    return r_ok, r_bad
