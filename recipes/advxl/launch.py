r"""Launch the AdvXL recipe: ``python -m recipes.advxl.launch --preset NAME [dotted.key=value ...]``.

Runs in this process by default (for several GPUs on one machine, ``torchrun --nproc-per-node N -m
recipes.advxl.launch ...``, which sets WORLD_SIZE/RANK for DDP). ``--cluster slurm`` submits the same run through
submitit (nodes, GPUs, partition, time limit, account, sbatch extras; see ``recipes/cluster.py``) and
``--cluster local`` runs it through submitit's local executor on this machine.
A run resumes from the latest valid checkpoint in ``run.out_dir``; ``--fresh`` starts over there (the old files are
moved aside), and a directory holding a run with another config is refused, naming the fields that differ. With
``run.compare_standard=true`` the same model is also trained with no attack, and both are reported side by side.

Examples:
    python -m recipes.advxl.launch                                   # the embedded default (digits, CPU)
    python -m recipes.advxl.launch --preset imagenette224 data.path=../shared/datasets/imagenette224
    python -m recipes.advxl.launch --preset cifar10 stages.0.samples=500000 run.out_dir=runs/c10
    python -m recipes.advxl.launch --preset embedded --dry-run       # print the resolved config, run nothing
    python -m recipes.advxl.launch --cluster slurm --partition gpu --nodes 2 --gpus-per-node 8 --time 720 \
        --max-requeues 3 --preset imagenet_vit_b16 data.path=/datasets/imagenet   # SLURM: 16 GPUs, up to 48 h
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from recipes import cli
from recipes.advxl.config import PRESETS, TrainConfig, phases, preset


def parse(argv: list[str] | None = None):
    """``(cfg, args)`` from the command line (see the module docstring)."""
    return cli.parse(
        argv,
        prog="python -m recipes.advxl.launch",
        doc=__doc__,
        presets=PRESETS,
        preset=preset,
        example="optim.lr=5e-4",
    )


def standard_twin(cfg: TrainConfig) -> TrainConfig:
    """The same run with every stage's attack switched off, in a sibling run directory."""
    stages = tuple(dataclasses.replace(s, attack=dataclasses.replace(s.attack, steps=0)) for s in cfg.stages)
    run = dataclasses.replace(cfg.run, out_dir=str(Path(cfg.run.out_dir) / "standard"), compare_standard=False)
    return dataclasses.replace(cfg, stages=stages, run=run)


def runs(cfg: TrainConfig) -> dict[str, TrainConfig]:
    """The training runs of a launch: ``cfg`` itself, or with ``run.compare_standard`` an adversarial and a
    standard run in ``out_dir/adversarial`` and ``out_dir/standard``, or a two-phase job's (``finetune`` set)
    pre-training and fine-tuning runs in ``out_dir/pretrain`` and ``out_dir/finetune`` (config.phases)."""
    if cfg.finetune is not None:
        return phases(cfg)
    if not cfg.run.compare_standard:
        return {"run": cfg}
    adv = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=str(Path(cfg.run.out_dir) / "adversarial")))
    return {"adversarial": adv, "standard": standard_twin(cfg)}


def comparison_table(adv: dict, std: dict, cfg: TrainConfig) -> str:
    key = f"pgd{cfg.eval.pgd_steps}"
    a, s = adv["evals"][-1], std["evals"][-1]
    lines = [
        f"| training | clean top-1 (%) | PGD-{cfg.eval.pgd_steps} top-1 (%) | train+eval time (s) |",
        "|---|---|---|---|",
        f"| AdvXL two-stage (adversarial) | {100 * a['clean']:.2f} | {100 * a[key]:.2f} | {adv['seconds']:.0f} |",
        f"| same model, standard training | {100 * s['clean']:.2f} | {100 * s[key]:.2f} | {std['seconds']:.0f} |",
    ]
    return (
        "\n".join(lines) + f"\n\nPGD-{cfg.eval.pgd_steps}: eps {cfg.eval.eps:.4f}, step {cfg.eval.pgd_step_size:.4f}, "
        f"{a['n']} validation images\n"
    )


def phases_table(results: dict, cfgs: dict[str, TrainConfig]) -> str:
    """A two-phase job's table: each phase's last evaluation (phase 1 zero-shot through the class names)."""
    lines = [
        "| phase | objective | stage | px | clean top-1 (%) | PGD top-1 (%) | train+eval time (s) |",
        "|---" * 7 + "|",
    ]
    for label, r in results.items():
        c, e = cfgs[label], r["evals"][-1]
        how = "contrastive vs caption features (zero-shot eval)" if c.clip_text else "supervised on labels"
        pgd = f"{100 * e[f'pgd{c.eval.pgd_steps}']:.2f} (PGD-{c.eval.pgd_steps})"
        lines.append(f"| {label} | {how} | {e['stage']} | {e['img_size']} | {100 * e['clean']:.2f} | {pgd} | ")
        lines[-1] += f"{r['seconds']:.0f} |"
    return "\n".join(lines) + f"\n\n{e['n']} validation images, eps {c.eval.eps:.4f}\n"


def run_local(cfg: TrainConfig) -> dict:
    from recipes.advxl import train

    cfgs = runs(cfg)
    results = {label: train.main(c) for label, c in cfgs.items()}
    if cfg.finetune is not None:
        table = phases_table(results, cfgs)
        Path(cfg.run.out_dir, "phases.md").write_text(table)
        print("\n" + table)
        return results | {"table": table}
    if not cfg.run.compare_standard:
        return results["run"]
    table = comparison_table(results["adversarial"], results["standard"], cfg)
    Path(cfg.run.out_dir, "comparison.md").write_text(table)
    print("\n" + table)
    return results | {"table": table}


def check(cfg: TrainConfig, world: int, *, files: bool = True) -> list[str]:
    """Raises ``ValueError`` (or ``FileNotFoundError``) for a config that cannot train with ``world`` processes.

    ``files=False`` (a dry run): a missing data path or file is not an error; what was not checked comes back.
    """
    from recipes.advxl.train import validate

    cfgs = list(runs(cfg).values())
    made = {c.model.init for c in cfgs[1:]} if cfg.finetune is not None else set()  # phase 1 writes phase 2's init

    def check_one(c: TrainConfig) -> None:
        unmade = c.model.init in made and not Path(c.model.init).exists()
        validate(dataclasses.replace(c, model=dataclasses.replace(c.model, init=None)) if unmade else c)

    return cli.check_runs(cfgs, world, validate=check_one, files=files)


def memory(cfg: TrainConfig, world: int) -> list[str]:
    """The dry run's per-GPU memory estimate at each stage's size (token masks: counted at all tokens)."""
    return cli.memory_lines(
        cfg.model.name,
        [s.img_size for s in cfg.stages],
        batch=cfg.data.batch_size,
        world=world,
        run=cfg.run,
        num_classes=cfg.model.num_classes,
        kwargs=cfg.model.kwargs,
    )


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse(argv)
    cli.main("advxl", cfg, args, check=check, run_local=run_local, memory=memory)


if __name__ == "__main__":
    main()
