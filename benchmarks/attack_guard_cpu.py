"""CPU cost of the attacks' non-finite guard and input checks (issue 17): this tree against a baseline revision.

The guard adds, per attack step, ``isfinite`` of the loss, a row sum of ``0 * gradient`` and one ``torch.where``
on the perturbation (apgd: three), and, per call, one host sync to decide whether to warn. This script times
the same attack calls with the library of a baseline git revision (default: the commit before the guard) and
with this tree, in one process: the baseline's ``advtrain`` is unpacked from ``git archive`` and imported as
``advtrain_base``. Calls alternate in pairs whose order flips each time (ABBA), each timed in CPU time of the
thread (``time.thread_time``), so that other processes on a shared machine do not count; the figure is the
median over calls of the paired ratio (this tree / baseline), with the 25th-75th percentiles. On a loaded
machine that ratio wanders by several percent either way, so the script also times the guard's own operations
in isolation on each workload's shapes (its gradient checks, its ``torch.where`` calls on ``(B, n)`` tensors and
the final count), which bounds its cost much more tightly: the ``guard share`` column is that time over the
call's.

Workloads, all 1 thread, float32, eval-mode models, random-init weights:

- ``mlp pgd-1``: a 2-layer MLP on 3x32x32 (batch 128), where the guard's elementwise work is the largest share
  of a step (a worst case);
- ``cnn pgd-1`` / ``cnn pgd-10 l2`` / ``cnn apgd-2``: a 4-conv CNN at 3x32x32 (batch 32), the training attack
  (PGD-1), a longer l_2 attack and Singh et al.'s 2-step APGD.

No GPU figure is measured here; on a GPU the per-call sync at the end is the extra cost to watch (not measured
on a GPU).

Usage::

    PYTHONPATH=$PWD python benchmarks/attack_guard_cpu.py              # baseline 9bc334b vs this tree
    PYTHONPATH=$PWD python benchmarks/attack_guard_cpu.py --iters 200 --baseline <rev>
"""

from __future__ import annotations

import argparse
import importlib
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ("mlp pgd-1", "cnn pgd-1", "cnn pgd-10 l2", "cnn apgd-2")


def _export(rev: str, into: Path) -> None:
    """Unpacks ``advtrain`` of ``rev`` under ``into`` as the package ``advtrain_base`` (imports rewritten)."""
    data = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "advtrain"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    (into / "advtrain").rename(into / "advtrain_base")
    for f in (into / "advtrain_base").rglob("*.py"):
        f.write_text(re.sub(r"\badvtrain\b", "advtrain_base", f.read_text()))


def _calls(attacks):
    """The workloads as zero-argument callables, for one library's ``advtrain.attacks`` module."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    cnn = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    ).eval()
    g = torch.Generator().manual_seed(0)
    xm, ym = torch.rand(128, 3, 32, 32, generator=g), torch.randint(0, 10, (128,), generator=g)
    xc, yc = xm[:32], ym[:32]
    pgd, apgd = attacks.pgd, attacks.apgd
    return {
        "mlp pgd-1": lambda: pgd(mlp, xm, ym, eps=8 / 255, step_size=10 / 255, steps=1),
        "cnn pgd-1": lambda: pgd(cnn, xc, yc, eps=8 / 255, step_size=10 / 255, steps=1),
        "cnn pgd-10 l2": lambda: pgd(cnn, xc, yc, eps=0.5, step_size=0.125, steps=10, norm="l2"),
        "cnn apgd-2": lambda: apgd(cnn, xc, yc, eps=4 / 255, steps=2),
    }


# Per workload: (batch, values per image, gradient checks, torch.where calls on (B, n) tensors) per call, counted
# from the code: pgd does one check and one where per step; apgd-2 checks the start and step 1 (step 2 has no
# gradient) and selects delta and momentum twice and the gradient twice.
GUARD_OPS = {
    "mlp pgd-1": (128, 3072, 1, 1),
    "cnn pgd-1": (32, 3072, 1, 1),
    "cnn pgd-10 l2": (32, 3072, 10, 10),
    "cnn apgd-2": (32, 3072, 2, 6),
}


def _guard_ms(name: str, iters: int) -> float:
    """Median CPU ms of the guard's own work for one call of workload ``name``, run alone."""
    import torch

    from advtrain.attacks import _guard

    b, n, checks, wheres = GUARD_OPS[name]
    g = torch.Generator().manual_seed(0)
    grad, delta, new = (torch.randn(b, n, generator=g) for _ in range(3))
    loss = torch.randn(b, generator=g)

    def work():
        skipped = _guard.Skipped(b, delta.device)
        bad = None
        for _ in range(checks):
            bad = _guard.bad_rows(loss, grad)
            skipped.add(bad)
        for _ in range(wheres):
            torch.where(bad.unsqueeze(1), delta, new)
        skipped.warn("bench", stacklevel=1)

    times = []
    for i in range(iters + 5):
        t = time.thread_time()
        work()
        if i >= 5:
            times.append(time.thread_time() - t)
    return 1e3 * statistics.median(times)


def _quartiles(v: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(v, n=4)
    return q[0], statistics.median(v), q[2]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default="9bc334b", help="git revision without the guard")
    p.add_argument("--iters", type=int, default=100, help="timed call pairs per workload")
    p.add_argument("--warmup", type=int, default=5)
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        _export(a.baseline, Path(tmp))
        sys.path.insert(0, tmp)
        try:
            base = _calls(importlib.import_module("advtrain_base.attacks"))
        finally:
            sys.path.remove(tmp)
        new = _calls(importlib.import_module("advtrain.attacks"))
        rows = []
        print(
            f"| workload | {a.baseline} (ms CPU) | this tree (ms CPU) | ratio: median (25-75%) of pairs | "
            f"guard ops alone (ms CPU) | guard share |"
        )
        print("|---|---|---|---|---|---|")
        for name in WORKLOADS:
            tb, tn = [], []
            for i in range(a.warmup + a.iters):
                pair = ((base[name], tb), (new[name], tn))
                for fn, out in pair if i % 2 else pair[::-1]:  # ABBA: neither side always runs second
                    t = time.thread_time()
                    fn()
                    if i >= a.warmup:
                        out.append(time.thread_time() - t)
            r25, r50, r75 = _quartiles([n / b for n, b in zip(tn, tb)])
            row = dict(
                workload=name,
                baseline_ms=1e3 * statistics.median(tb),
                new_ms=1e3 * statistics.median(tn),
                ratio=r50,
                ratio_q25=r25,
                ratio_q75=r75,
                guard_ops_ms=_guard_ms(name, 4 * a.iters),
            )
            row["guard_share"] = row["guard_ops_ms"] / row["new_ms"]
            rows.append(row)
            print(
                f"| {name} | {row['baseline_ms']:.2f} | {row['new_ms']:.2f} | {r50:.3f} ({r25:.3f}-{r75:.3f}) | "
                f"{row['guard_ops_ms']:.3f} | {100 * row['guard_share']:.1f}% |"
            )
    print(f"\n{a.iters} call pairs per workload, 1 thread, CPU time of the thread; torch {torch.__version__}")
    return rows


if __name__ == "__main__":
    main()
