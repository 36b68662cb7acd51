"""Test-time resolution sweep of the AdvXL embedded default's adversarially trained ViT (CPU, a few seconds).

Run the main job first (``python -m recipes.advxl.launch``), then:
    python benchmarks/resolution_embedded.py [runs/advxl-embedded/two_stage]
Writes benchmarks/results/resolution_embedded.{md,png}.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

from advtrain import pgd
from advtrain.data._recipe import digits_arrays
from advtrain.eval import format_resolution_table, plot_resolution, resolution_sweep
from advtrain.training import load_latest_checkpoint
from recipes.advxl import train
from recipes.advxl.config import load_config


def main() -> None:
    torch.set_num_threads(1)
    run_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/advxl-embedded/two_stage")
    cfg = load_config(run_dir / "config.json")
    state = load_latest_checkpoint(run_dir, print)
    model = train.build_model(cfg)
    model.load_state_dict(state["model"])
    _, _, xv, yv = digits_arrays(cfg.run.seed)
    batches = [(xv[i : i + 150].float() / 255, yv[i : i + 150]) for i in range(0, len(yv), 150)]
    e = cfg.eval
    attack = functools.partial(
        pgd, eps=e.eps, step_size=e.pgd_step_size, steps=e.pgd_steps, generator=torch.Generator().manual_seed(0)
    )
    results = resolution_sweep(model, batches, sizes=[16, 24, 32, 40, 48], attacks={"pgd20": attack}, progress=False)
    table = format_resolution_table(results)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "resolution_embedded.md").write_text(
        f"Model: {run_dir} (trained 16 px then 32 px), digits val ({len(yv)} images), PGD-20 eps {e.eps}, "
        f"step {e.pgd_step_size}; torch {torch.__version__}, CPU, 1 thread.\n\n{table}\n"
    )
    plot_resolution(results, out / "resolution_embedded.png")
    print(table)


if __name__ == "__main__":
    main()
