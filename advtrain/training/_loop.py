"""Small pieces every training loop repeats: precision, MixUp, when to log, a finite loss, capped evaluation."""

from __future__ import annotations

import contextlib
import difflib
import math
import warnings
from collections.abc import Iterable, Iterator
from typing import Literal

import torch
from torch.utils.data import IterableDataset


def autocast(precision: Literal["fp32", "bf16"], device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` for ``"bf16"``, nothing for ``"fp32"`` (the model's weights stay fp32)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"precision must be 'fp32' or 'bf16'; got {precision!r}")
    return contextlib.nullcontext()


def make_mixup(*, mixup: float, cutmix: float, label_smoothing: float, num_classes: int):
    """timm's ``Mixup`` (MixUp and/or CutMix with label smoothing, soft targets), or None when both are off."""
    if not (mixup or cutmix):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=num_classes)


def log_due(step: int, *, every: int, total: int | None) -> bool:
    """Whether step ``step`` (1-based, after the update) gets a metrics line: the first, every ``every``-th, and
    the last (``total``), so that a run shorter than ``every`` steps still has a curve.

    Example:
        >>> [s for s in range(1, 8) if log_due(s, every=3, total=7)]
        [1, 3, 6, 7]
    """
    return step == 1 or step % every == 0 or step == total


class Every:
    """Fires when a counter (samples seen) reaches the next multiple of ``n`` (or when forced); for checkpoints.

    Example:
        >>> due = Every(100, start=150)
        >>> [x for x in (180, 200, 250, 260, 400) if due(x)]
        [200, 400]
    """

    def __init__(self, n: int, *, start: int = 0):
        if n < 1:
            raise ValueError(f"Every needs n >= 1; got {n}")
        self.n, self.next = n, (start // n + 1) * n

    def __call__(self, x: int, *, force: bool = False) -> bool:
        if x < self.next and not force:
            return False
        self.next = (x // self.n + 1) * self.n
        return True


def check_finite(loss: float, *, step: int, where: str) -> None:
    """Raises ``FloatingPointError`` naming the step when the training loss is NaN or infinite."""
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {step} ({where}); lower optim.lr?")


def take(loader: Iterable, limit: int | None) -> Iterator:
    """The loader's ``[images, labels, ...]`` batches up to ``limit`` samples (the last batch cut); all with None.

    Raises:
        ValueError: an endless stream (an ``IterableDataset``) with no ``limit``.
    """
    n = 0
    for b in loader:
        if limit is not None and n >= limit:
            return
        if limit is not None and n + len(b[1]) > limit:
            b = [b[0][: limit - n], b[1][: limit - n]]
        n += len(b[1])
        yield b
        if isinstance(getattr(loader, "dataset", None), IterableDataset) and limit is None:
            raise ValueError("streaming validation data needs data.val_samples")


@contextlib.contextmanager
def quiet_set_vital() -> Iterator[None]:
    """Hides torchdata's "'set_vital' is deprecated" warning, which ``StatefulDataLoader()`` emits on every
    construction with recent torch (torchdata 0.11 calls a deprecated torch function); nothing else is hidden."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
        yield


def check_timm_model(name: str) -> None:
    """Raises ``ValueError`` for a name timm does not know, with the closest names it does."""
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise ValueError(f"unknown timm model {name!r}" + (f"; did you mean {close}?" if close else ""))
