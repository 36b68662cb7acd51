"""AdvXL under run.parallel=fsdp vs ddp vs one process, and DCP resume, on CPU (2 gloo processes).

The runs of ``tests/recipes/test_fsdp.py`` (a 1-block ViT on digits, 6 steps: 4 at 16 px PGD-1, 2 at 32 px PGD-2,
random start off, EMA 0.9, FSDP with activation checkpointing), with their losses and differences written out:

* the training losses of FSDP (2 ranks x 16 images), DDP (2 x 16) and one process (32), and their largest
  relative differences;
* a 2-process FSDP run stopped after its 64-sample DCP checkpoint and resumed on 2 processes (the largest weight
  difference from the straight run) and on 1 process (weights as loaded, AdamW step count, losses after it).

    python benchmarks/fsdp_equivalence_cpu.py      # ~1 min on 2 cores; writes results/fsdp_equivalence_cpu.md
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> str:
    import torch

    from tests.gloo import spawn_gloo
    from tests.recipes import test_fsdp as t

    root = pathlib.Path(tempfile.mkdtemp(prefix="fsdp-eq-"))
    start = time.perf_counter()
    spawn_gloo(t._fsdp_worker, str(root))
    spawn_gloo(t._ddp_worker, str(root))
    t.train.main(t.cfg_of(root / "one", "ddp"))
    spawn_gloo(t._one_process_resume, str(root), world=1)
    seconds = time.perf_counter() - start
    fsdp, ddp, one = (t.losses(root / d / "run") for d in ("a", "ddp", "one"))
    rel = lambda a, b: max(abs(x - y) / abs(y) for x, y in zip(a, b))  # noqa: E731
    a, b = torch.load(root / "a-rank0.pt"), torch.load(root / "b-rank0.pt")
    resumed2 = max((a[k] - b[k]).abs().max().item() for k in a)
    r1 = json.loads((root / "c.json").read_text())
    fmt = lambda xs: ", ".join(f"{x:.7f}" for x in xs)  # noqa: E731
    text = (
        "# AdvXL: FSDP vs DDP vs one process, DCP resume (CPU, 2 gloo processes)\n\n"
        f"`python benchmarks/fsdp_equivalence_cpu.py`; torch {torch.__version__}; {seconds:.0f} s; "
        f"{time.strftime('%Y-%m-%d')}.\n\n"
        "| run | training losses (6 steps) |\n|---|---|\n"
        f"| FSDP + AC, 2 x 16 | {fmt(fsdp)} |\n| DDP, 2 x 16 | {fmt(ddp)} |\n| one process, 32 | {fmt(one)} |\n\n"
        f"Largest relative loss difference: FSDP-DDP {rel(fsdp, ddp):.2e}, FSDP-one process {rel(fsdp, one):.2e}, "
        f"DDP-one process {rel(ddp, one):.2e}.\n\n"
        f"DCP resume at 64 samples on 2 processes: largest final-weight difference from the straight run "
        f"{resumed2:.1e}; losses equal: {t.losses(root / 'a' / 'run') == t.losses(root / 'b' / 'run')}.\n\n"
        f"On 1 process: weights as loaded vs the checkpoint's, largest difference {r1['diff']:.1e}; AdamW steps "
        f"{r1['steps']}; losses after the resume (the loader restarts its stream) {fmt(r1['losses'][2:])} against "
        f"the straight run's {fmt(fsdp[2:])}.\n"
    )
    out = ROOT / "benchmarks" / "results" / "fsdp_equivalence_cpu.md"
    out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
