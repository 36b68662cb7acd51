r"""Launch the AdvXL recipe: ``python -m recipes.advxl.launch --preset NAME [dotted.key=value ...]``.

Runs in this process by default (for several GPUs on one machine, ``torchrun --nproc-per-node N -m
recipes.advxl.launch ...``, which sets WORLD_SIZE/RANK for DDP). ``--cluster slurm`` submits the same run through
submitit (nodes, GPUs, partition, time limit, account, sbatch extras; see ``recipes/cluster.py``) and
``--cluster local`` runs it through submitit's local executor on this machine.
A run resumes from the latest valid checkpoint in ``run.out_dir``; ``--fresh`` starts over there (the old files are
moved aside), and a directory holding a run with another config is refused, naming the fields that differ. With
``run.compare_one_stage=true`` one-stage full-resolution adversarial training for the same samples seen, and with
``run.compare_standard=true`` the same model with no attack, are trained too and reported beside the two-stage run
(``comparison.md``; the embedded default does both).

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
    """The same run with every stage's attack switched off, in ``out_dir/standard``."""
    stages = tuple(dataclasses.replace(s, attack=dataclasses.replace(s.attack, steps=0)) for s in cfg.stages)
    return dataclasses.replace(cfg, stages=stages, run=_sub_run(cfg, "standard"))


def one_stage_twin(cfg: TrainConfig) -> TrainConfig:
    """One-stage full-resolution adversarial training for the same samples seen, in ``out_dir/one_stage``.

    A single stage ``full`` with the last stage's image size, reducer and attack (AdvXL's PGD-3 at 224 px, here
    throughout) for ``cfg.total_samples``, with the first stage's learning rate, lr warmup and eps warmup: the
    baseline AdvXL's coarse-to-fine schedule claims to match at a fraction of the cost.

    Raises:
        ValueError: ``cfg`` has a single stage (its one-stage twin would be itself).
    """
    if len(cfg.stages) < 2:
        raise ValueError(f"run.compare_one_stage needs two or more stages; got {[s.name for s in cfg.stages]}")
    first, last = cfg.stages[0], cfg.stages[-1]
    full = dataclasses.replace(
        last,
        name="full",
        samples=cfg.total_samples,
        lr=first.lr,
        warmup_samples=first.warmup_samples,
        eps_warmup_samples=first.eps_warmup_samples,
    )
    return dataclasses.replace(cfg, stages=(full,), run=_sub_run(cfg, "one_stage"))


def _sub_run(cfg: TrainConfig, label: str):
    return dataclasses.replace(
        cfg.run, out_dir=str(Path(cfg.run.out_dir) / label), compare_standard=False, compare_one_stage=False
    )


def runs(cfg: TrainConfig) -> dict[str, TrainConfig]:
    """The training runs of a launch: ``cfg`` itself; a two-phase job's (``finetune`` set) pre-training and
    fine-tuning runs in ``out_dir/pretrain`` and ``out_dir/finetune`` (config.phases); or a comparison in
    sub-directories of ``run.out_dir``: ``two_stage`` (``cfg``'s stages), with ``run.compare_one_stage``
    ``one_stage`` (:func:`one_stage_twin`) and with ``run.compare_standard`` ``standard`` (:func:`standard_twin`)."""
    if cfg.finetune is not None:
        return phases(cfg)
    if not (cfg.run.compare_standard or cfg.run.compare_one_stage):
        return {"run": cfg}
    out = {"two_stage": dataclasses.replace(cfg, run=_sub_run(cfg, "two_stage"))}
    if cfg.run.compare_one_stage:
        out["one_stage"] = one_stage_twin(cfg)
    if cfg.run.compare_standard:
        out["standard"] = standard_twin(cfg)
    return out


NAMES = {
    "two_stage": "AdvXL two-stage",
    "one_stage": "one-stage full resolution",
    "standard": "standard training (no attack)",
}


def cost(cfg: TrainConfig) -> float:
    """Nominal training compute in full-resolution clean forward-backward passes.

    Per stage: ``samples x (attack steps + 1) x (img_size / full size)^2 x keep_ratio``; an attack step is counted
    as a whole forward-backward (it needs the input gradient only, so it is somewhat cheaper), and the cost of a
    pass as proportional to the tokens (pixels) it sees.
    """
    full = cfg.stages[-1].img_size
    return sum(s.samples * (s.attack.steps + 1) * (s.img_size / full) ** 2 * s.keep_ratio for s in cfg.stages)


def schedule(cfg: TrainConfig) -> str:
    """The stages in a few words: ``16 px PGD-1 x 36,000 + 32 px PGD-3 x 6,400`` (configured samples)."""
    attack = lambda a: f"{a.kind.upper()}-{a.steps}" if a.steps else "clean"  # noqa: E731
    return " + ".join(f"{s.img_size} px {attack(s.attack)} x {s.samples:,}" for s in cfg.stages)


def comparison_table(results: dict[str, dict], cfgs: dict[str, TrainConfig]) -> str:
    """The launch's ``comparison.md``: one row per run (the samples it saw, whole batches; nominal cost; final
    accuracies; measured times), then each run's accuracies at every stage's end."""
    c0 = next(iter(cfgs.values()))
    k, key = c0.eval.pgd_steps, f"pgd{c0.eval.pgd_steps}"
    ref = cost(cfgs["one_stage"]) if "one_stage" in cfgs else cost(c0)
    lines = [
        f"| training | schedule | samples seen | cost (full-res fwd+bwd passes) | clean top-1 (%) | PGD-{k} top-1 (%) "
        "| train time (s) | train+eval time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        c, e = cfgs[label], r["evals"][-1]
        lines.append(
            f"| {NAMES.get(label, label)} | {schedule(c)} | {e['samples']:,} | {cost(c):,.0f} "
            f"({cost(c) / ref:.2f}x) | {100 * e['clean']:.2f} | {100 * e[key]:.2f} | {r['train_seconds']:.0f} "
            f"| {r['seconds']:.0f} |"
        )
    per_stage = [
        f"- {NAMES.get(label, label)}: "
        + " -> ".join(
            f"{ev['stage']} ({ev['samples']:,} samples, at {ev['img_size']} px) "
            f"{100 * ev['clean']:.2f} / {100 * ev[key]:.2f}"
            for ev in r["evals"]
        )
        for label, r in results.items()
        if len(r["evals"]) > 1
    ]
    e = results[next(iter(results))]["evals"][-1]
    note = (
        f"\nPGD-{k}: l_inf eps {c0.eval.eps:.4f}, step {c0.eval.pgd_step_size:.4f}, {e['n']} validation images at "
        f"{e['img_size']} px. Train time: the training steps alone; train+eval: the run's wall-clock.\n"
    )
    if per_stage:
        note += f"\nClean / PGD-{k} top-1 (%) at each stage's end:\n\n" + "\n".join(per_stage) + "\n"
    return "\n".join(lines) + "\n" + note


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
    if "run" in results:
        return results["run"]
    table = comparison_table(results, cfgs)
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
        ema=cfg.optim.ema_decay is not None,
    )


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse(argv)
    cli.main("advxl", cfg, args, check=check, run_local=run_local, memory=memory)


if __name__ == "__main__":
    main()
