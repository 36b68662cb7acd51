"""Launch the AdvXL recipe: ``python -m recipes.advxl.launch --preset NAME [dotted.key=value ...]``.

Runs in this process by default (for several GPUs on one machine, ``torchrun --nproc-per-node N -m
recipes.advxl.launch ...``, which sets WORLD_SIZE/RANK for DDP). ``--cluster slurm`` submits the same run through
submitit (nodes, GPUs, partition, time limit, account, sbatch extras; see ``recipes/cluster.py``) and
``--cluster local`` runs it through submitit's local executor on this machine.
A run resumes from the latest valid checkpoint in ``run.out_dir``. With ``run.compare_standard=true`` the same
model is also trained with no attack, and both are reported side by side.

Examples:
    python -m recipes.advxl.launch                                   # the embedded default (digits, CPU)
    python -m recipes.advxl.launch --preset imagenette224 data.path=../shared/datasets/imagenette224
    python -m recipes.advxl.launch --preset cifar10 stages.0.samples=500000 run.out_dir=runs/c10
    python -m recipes.advxl.launch --preset embedded --dry-run       # print the resolved config, run nothing
    python -m recipes.advxl.launch --cluster slurm --partition gpu --nodes 2 --gpus-per-node 8 --time 2880 \
        --preset imagenet_vit_b16 data.path=/datasets/imagenet         # SLURM: 16 GPUs, requeued on preemption
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from recipes import cluster
from recipes.advxl.config import PRESETS, TrainConfig, override, preset


def parse(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m recipes.advxl.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="embedded", choices=sorted(PRESETS), help="a named configuration")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config (with --cluster: also the job parameters and sbatch script) and exit")
    p.add_argument("overrides", nargs="*", help="dotted.key=value (JSON values), e.g. optim.lr=5e-4")
    cluster.add_cluster_args(p)
    args = p.parse_args(argv)
    try:
        cfg = override(preset(args.preset), args.overrides)
    except (ValueError, TypeError) as err:
        p.error(str(err))
    return cfg, args


def standard_twin(cfg: TrainConfig) -> TrainConfig:
    """The same run with every stage's attack switched off, in a sibling run directory."""
    stages = tuple(dataclasses.replace(s, attack=dataclasses.replace(s.attack, steps=0)) for s in cfg.stages)
    run = dataclasses.replace(cfg.run, out_dir=str(Path(cfg.run.out_dir) / "standard"), compare_standard=False)
    return dataclasses.replace(cfg, stages=stages, run=run)


def comparison_table(adv: dict, std: dict, cfg: TrainConfig) -> str:
    key = f"pgd{cfg.eval.pgd_steps}"
    a, s = adv["evals"][-1], std["evals"][-1]
    lines = [
        f"| training | clean top-1 (%) | PGD-{cfg.eval.pgd_steps} top-1 (%) | train+eval time (s) |",
        "|---|---|---|---|",
        f"| AdvXL two-stage (adversarial) | {100 * a['clean']:.2f} | {100 * a[key]:.2f} | {adv['seconds']:.0f} |",
        f"| same model, standard training | {100 * s['clean']:.2f} | {100 * s[key]:.2f} | {std['seconds']:.0f} |",
    ]
    return "\n".join(lines) + f"\n\nPGD-{cfg.eval.pgd_steps}: eps {cfg.eval.eps:.4f}, step {cfg.eval.pgd_step_size:.4f}, " \
                              f"{a['n']} validation images\n"


def run_local(cfg: TrainConfig) -> dict:
    from recipes.advxl import train

    if not cfg.run.compare_standard:
        return train.main(cfg)
    adv_cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=str(Path(cfg.run.out_dir) / "adversarial")))
    adv = train.main(adv_cfg)
    std = train.main(standard_twin(cfg))
    table = comparison_table(adv, std, cfg)
    Path(cfg.run.out_dir, "comparison.md").write_text(table)
    print("\n" + table)
    return {"adversarial": adv, "standard": std, "table": table}


def check(cfg: TrainConfig, world: int) -> None:
    """Raises ``ValueError`` (or ``FileNotFoundError``) for a config that cannot train with ``world`` processes."""
    from recipes.advxl.train import validate

    validate(cfg)
    if cfg.data.batch_size % world:
        raise ValueError(f"data.batch_size ({cfg.data.batch_size}) is the global batch: it must divide evenly over "
                         f"{world} processes")


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse(argv)
    if args.cluster:
        cluster.main_or_exit("advxl", cfg, args, check=check)
        return
    if args.dry_run:
        print(json.dumps(cfg.to_dict(), indent=2))
        return
    try:
        check(cfg, 1)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"configuration error: {err}")
    start = time.perf_counter()
    run_local(cfg)
    print(f"total wall-clock: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
