"""Loop timing: the wait for data, the step itself, end-to-end images per second, time summed over resumes."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch


def cycle(loader: Iterable) -> Iterator:
    """The loader's batches, epoch after epoch, without end (a stateful loader resumes where its state says)."""
    while True:
        yield from loader


class StepTimer:
    """Times each iteration of a training loop: ``next(batches)`` (the data wait), then the step.

    ``window()`` summarizes the iterations since its last call, for a metrics line: ``data_wait_s`` (mean seconds
    per step spent in ``next``) and ``img_per_s`` (images / wall time of the whole iterations, data wait
    included: the real end-to-end throughput). ``train_seconds`` sums the step times (no data wait, no
    evaluation) and ``seconds`` the wall-clock since the run began, both carried over resumes through
    :meth:`state`. On CUDA each step ends with a synchronize, so step times are the device's.

    Args:
        device: the training device.
        state: what :meth:`state` returned in an earlier (interrupted) process, or None.

    Example:
        >>> t = StepTimer(torch.device("cpu"))
        >>> batch = t.next(iter([torch.zeros(8)]))
        >>> t.done(8)
        >>> sorted(t.window())
        ['data_wait_s', 'img_per_s']
    """

    def __init__(self, device: torch.device, state: dict | None = None):
        self.device = device
        self.train_seconds = float((state or {}).get("train_seconds", 0.0))
        self._prior = float((state or {}).get("seconds", 0.0))
        self._start = time.perf_counter()
        self._t0 = self._t1 = self._start
        self._wait = self._wall = 0.0
        self._images = self._steps = 0

    def next(self, batches: Iterator) -> Any:
        """The next batch, timing the wait for it."""
        self._t0 = time.perf_counter()
        batch = next(batches)
        self._t1 = time.perf_counter()
        self._wait += self._t1 - self._t0
        return batch

    def done(self, images: int) -> None:
        """Ends the iteration that :meth:`next` began: ``images`` were trained on (this process's count)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t2 = time.perf_counter()
        self.train_seconds += t2 - self._t1
        self._wall += t2 - self._t0
        self._images += images
        self._steps += 1

    def window(self) -> dict[str, float]:
        """``data_wait_s`` and ``img_per_s`` over the iterations since the last call; starts a new window."""
        out = {
            "data_wait_s": self._wait / self._steps if self._steps else math.nan,
            "img_per_s": self._images / self._wall if self._wall > 0 else math.nan,
        }
        self._wait = self._wall = 0.0
        self._images = self._steps = 0
        return out

    @property
    def seconds(self) -> float:
        """Wall-clock seconds of the run so far, earlier (resumed) processes included."""
        return self._prior + time.perf_counter() - self._start

    def state(self) -> dict[str, float]:
        """``{"train_seconds", "seconds"}`` for a checkpoint."""
        return {"train_seconds": self.train_seconds, "seconds": self.seconds}
