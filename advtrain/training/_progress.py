"""Console output of a run: a log function, a throttled progress bar on terminals, summary lines elsewhere."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from advtrain.training._distributed import Dist


def interactive() -> bool:
    """Whether stdout is a terminal (a progress bar redraws there; a SLURM log or a pipe gets lines instead)."""
    return sys.stdout.isatty()


def run_logger(name: str, dd: Dist) -> Callable[[str], None]:
    """``log(msg)``: prints ``[name] msg`` on rank 0 (above a progress bar, if one is drawn), nothing elsewhere."""
    if not dd.main:
        return lambda msg: None
    from tqdm.auto import tqdm

    return lambda msg: tqdm.write(f"[{name}] {msg}", file=sys.stdout)


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """Training progress: a tqdm bar on a terminal, redrawn at most ``1 / min_interval`` times a second; where
    stdout is not a terminal (a SLURM log, a pipe), no bar but one summary line every ``every`` steps.

    Args:
        total: units (samples or steps) of the whole run.
        initial: units already done (a resumed run).
        unit: ``"img"`` or ``"step"``.
        desc: the bar's label.
        dd: this process (only rank 0 shows anything).
        every: steps between summary lines (non-terminal output), e.g. ``run.log_every``.
        log: where summary lines go.
        min_interval: seconds between redraws of the bar.
        tty: override the terminal check (None: :func:`interactive`).

    Example:
        >>> lines = []
        >>> p = Progress(total=4, initial=0, unit="step", desc="demo", dd=Dist(), every=2, log=lines.append, tty=False)
        >>> for _ in range(4):
        ...     p.update(1, loss=1.0)
        >>> p.close(); [line.split(" (")[0] for line in lines]
        ['demo 2/4 step', 'demo 4/4 step']
    """

    def __init__(
        self,
        *,
        total: int,
        initial: int,
        unit: str,
        desc: str,
        dd: Dist,
        every: int,
        log: Callable[[str], None],
        min_interval: float = 0.5,
        tty: bool | None = None,
    ):
        self.total, self.done, self.unit, self.desc, self.every, self.log = total, initial, unit, desc, every, log
        self.enabled = dd.main
        self.tty = interactive() if tty is None else tty
        self.steps, self.start, self.start_done = 0, time.perf_counter(), initial
        self.bar = None
        if self.enabled and self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                unit=unit,
                unit_scale=unit == "img",
                desc=desc,
                dynamic_ncols=True,
                mininterval=min_interval,
                miniters=1,
                file=sys.stdout,
            )

    def update(self, n: int, **postfix: Any) -> None:
        """``n`` more units done by one step; ``postfix`` values are shown beside the bar (or in the line)."""
        if not self.enabled:
            return
        self.done += n
        self.steps += 1
        shown = {k: f"{v:.3g}" if isinstance(v, float) else v for k, v in postfix.items()}
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(n)
        elif self.steps % self.every == 0 or self.done >= self.total:
            elapsed = time.perf_counter() - self.start
            rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            extra = " ".join(f"{k} {v}" for k, v in shown.items())
            self.log(
                f"{self.desc} {self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%, "
                f"{rate:.3g} {self.unit}/s, elapsed {_fmt_time(elapsed)}, eta {_fmt_time(eta)}) {extra}".rstrip()
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
