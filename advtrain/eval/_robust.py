"""Clean and robust accuracy over a data loader, with a progress bar and a per-batch summary."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

AttackFn = Callable[[Callable[[Tensor], Tensor], Tensor, Tensor], Tensor]


class EvalReport(NamedTuple):
    """Accuracies over ``n`` samples: ``clean`` and one robust accuracy per attack, in [0, 1]."""

    n: int
    clean: float
    robust: dict[str, float]
    seconds: float

    def table(self) -> str:
        """A small markdown table of the accuracies in percent."""
        rows = [("clean", self.clean)] + list(self.robust.items())
        lines = ["| metric | accuracy (%) |", "|---|---|"] + [f"| {k} | {100 * v:.2f} |" for k, v in rows]
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

    Args:
        model: maps ``(B, C, H, W)`` pixels in [0, 1] to ``(B, K)`` logits.
        loader: yields ``(x, y)`` pairs (extra items are ignored): ``x`` floating pixels, ``y`` int64 labels.
        attacks: name -> ``attack(model, x, y) -> x_adv``; e.g. the AdvXL paper's PGD-20
            ``functools.partial(pgd, eps=4/255, step_size=1/255, steps=20)``, or :func:`autoattack` likewise.
        device: moves each batch there (default: leave batches where they are).
        max_samples: stop after this many samples (the last batch is cut), e.g. a fixed AutoAttack subset.
        progress: show a tqdm bar with running accuracies.
        log_every: also print a summary line every this many batches (useful in SLURM logs).
        desc: the bar's label.

    Returns:
        An :class:`EvalReport`.

    Raises:
        ValueError: an empty loader, or ``max_samples < 1``.

    Example:
        >>> import functools, torch
        >>> from advtrain import pgd
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> data = [(torch.rand(8, 1, 2, 2), torch.randint(0, 2, (8,)))]
        >>> r = evaluate(model, data, attacks={"pgd": functools.partial(pgd, eps=0.1, step_size=0.05, steps=2)},
        ...              progress=False)
        >>> r.n, 0 <= r.robust["pgd"] <= r.clean
        (8, True)
    """
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1; got {max_samples}")
    attacks = dict(attacks or {})
    n, clean = 0, 0
    robust = {name: 0 for name in attacks}
    start = time.perf_counter()
    bar = tqdm(total=max_samples, desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    with eval_mode(model):
        for i, batch in enumerate(loader):
            x, y = batch[0], batch[1]
            if device is not None:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if max_samples is not None:
                x, y = x[: max_samples - n], y[: max_samples - n]
            with torch.no_grad():
                ok = model(x).argmax(1) == y
            clean += int(ok.sum())
            for name, attack in attacks.items():
                robust[name] += _robust_count(model, attack, x, y, ok)
            n += x.shape[0]
            bar.update(x.shape[0])
            summary = {"clean": f"{100 * clean / n:.1f}"} | {k: f"{100 * v / n:.1f}" for k, v in robust.items()}
            bar.set_postfix(summary)
            if log_every and (i + 1) % log_every == 0:
                bar.write(f"[{desc}] batch {i + 1}: {n} samples, " + ", ".join(f"{k} {v}%" for k, v in summary.items()))
            if max_samples is not None and n >= max_samples:
                break
    bar.close()
    if n == 0:
        raise ValueError("the loader yielded no samples")
    return EvalReport(n, clean / n, {k: v / n for k, v in robust.items()}, time.perf_counter() - start)


def _robust_count(model, attack: AttackFn, x: Tensor, y: Tensor, ok: Tensor) -> int:
    if not bool(ok.any()):
        return 0
    x_ok, y_ok = x[ok], y[ok]
    x_adv = attack(model, x_ok, y_ok)
    with torch.no_grad():
        return int((model(x_adv).argmax(1) == y_ok).sum())
