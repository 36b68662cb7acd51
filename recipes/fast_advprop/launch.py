r"""Launch the Fast AdvProp recipe: ``python -m recipes.fast_advprop.launch --preset NAME [dotted.key=value ...]``.

Runs in this process by default (for several GPUs on one machine, ``torchrun --nproc-per-node N -m
recipes.fast_advprop.launch ...``, which sets WORLD_SIZE/RANK for DDP). ``--cluster slurm`` submits the same run
through submitit (see ``recipes/cluster.py``) and ``--cluster local`` runs it through submitit's local executor.
A run resumes from the latest valid checkpoint in ``run.out_dir``; ``--fresh`` starts over there (the old files
are moved aside), and a directory holding a run with another config is refused, naming the fields that differ.
With ``run.compare=true`` the launcher trains four runs at the same budget, each in its own sub-directory, and
prints one table: Fast AdvProp (the config as given), vanilla, AdvProp PGD-5 and AdvProp PGD-1. The baselines
load the Fast AdvProp run's clean images per step (its batch minus the attacked share), so every method sees the
same clean batch and learning rate, as in the paper's scripts.

Examples:
    python -m recipes.fast_advprop.launch                                  # embedded default: digits, CPU, 4 runs
    python -m recipes.fast_advprop.launch --preset imagenette224
    python -m recipes.fast_advprop.launch --preset imagenet_resnet50 data.path=/datasets/imagenet
    python -m recipes.fast_advprop.launch --preset cifar10 method=advprop adv.advprop_steps=1 data.batch_size=128
    python -m recipes.fast_advprop.launch --preset embedded --dry-run      # print the resolved config, run nothing
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from recipes import cli
from recipes.fast_advprop.config import PRESETS, TrainConfig, cost_per_epoch, preset, run_epochs, split_counts


def parse(argv: list[str] | None = None):
    """``(cfg, args)`` from the command line (see the module docstring)."""
    return cli.parse(
        argv,
        prog="python -m recipes.fast_advprop.launch",
        doc=__doc__,
        presets=PRESETS,
        preset=preset,
        example="optim.lr=0.05 method=vanilla",
    )


def baselines(cfg: TrainConfig) -> dict[str, TrainConfig]:
    """The four runs of a comparison, by label, each in a sub-directory of ``run.out_dir``.

    Baselines load the clean images of one Fast AdvProp step ((1 - p_adv) x batch), so the clean batch, the
    learning rate and the BN groups' clean share stay the same across methods; each runs its calibrated epochs.
    """
    clean = split_counts(cfg, cfg.data.batch_size)[0] if cfg.method == "fast_advprop" else cfg.data.batch_size
    out = {}
    for label, method, steps in (
        ("fast_advprop", "fast_advprop", None),
        ("vanilla", "vanilla", None),
        ("advprop_pgd5", "advprop", 5),
        ("advprop_pgd1", "advprop", 1),
    ):
        c = dataclasses.replace(
            cfg,
            method=method,
            run=dataclasses.replace(cfg.run, out_dir=str(Path(cfg.run.out_dir) / label), compare=False),
        )
        if method != "fast_advprop":
            c = dataclasses.replace(c, data=dataclasses.replace(cfg.data, batch_size=clean))
        if steps is not None:
            c = dataclasses.replace(c, adv=dataclasses.replace(cfg.adv, advprop_steps=steps))
        out[label] = c
    return out


def comparison_table(results: dict[str, dict], cfgs: dict[str, TrainConfig]) -> str:
    any_cfg = next(iter(cfgs.values()))
    key = f"pgd{any_cfg.eval.pgd_steps}"
    lines = [
        f"| method | images / step (clean + attacked) | epochs | cost / epoch | clean top-1 (%) | "
        f"PGD-{any_cfg.eval.pgd_steps} top-1 (%) | corruption error (%) | train time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = {
        "fast_advprop": "Fast AdvProp",
        "vanilla": "vanilla",
        "advprop_pgd5": "AdvProp PGD-5",
        "advprop_pgd1": "AdvProp PGD-1",
    }
    for label, r in results.items():
        c, e = cfgs[label], r["evals"][-1]
        n_clean, n_adv = split_counts(c, c.data.batch_size)
        ce = f"{100 * e['corruption_error']:.2f}" if "corruption_error" in e else "-"
        pg = f"{100 * e[key]:.2f}" if key in e else "-"
        name = names.get(label, label)
        if c.method == "fast_advprop":
            name += f" (p_adv {c.adv.p_adv:g}, PGD-{c.adv.steps})"
        lines.append(
            f"| {name} | {n_clean} + {n_adv} | {run_epochs(c):.2f} | {cost_per_epoch(c):g}x | "
            f"{100 * e['clean']:.2f} | {pg} | {ce} | {r['train_seconds']:.0f} |"
        )
    e, c = next(iter(results.values()))["evals"][-1], any_cfg
    note = (
        f"\nBudget: {c.optim.epochs:g} vanilla epochs each (epochs x cost / epoch). PGD-{c.eval.pgd_steps}: "
        f"l_inf eps {255 * c.eval.eps:g}/255, step {255 * c.eval.pgd_step_size:g}/255, {e['n']} images. "
    )
    if "corruption_n" in e:
        note += (
            f"Corruption error: {e.get('corruption_source', 'ImageNet-C')}, mean top-1 error over "
            f"{len(c.eval.corruptions)} corruptions x {len(c.eval.severities)} severities on {e['corruption_n']} images"
        )
        if e.get("corruption_mce") is not None:  # AlexNet's errors are the official release's
            approx = "" if e.get("corruption_official") else ", indicative: other images than AlexNet's"
            note += f"; mCE {100 * e['corruption_mce']:.2f}% (AlexNet-normalized{approx})"
        note += "."
    for key in ("imagenet_r", "stylized"):  # the folder sets, one line per method
        if f"{key}_error" in e:
            errs = ", ".join(
                f"{names.get(k, k)} {100 * r['evals'][-1][f'{key}_error']:.2f}" for k, r in results.items()
            )
            note += f"\n{e[f'{key}_source']}, top-1 error (%): {errs}."
    return "\n".join(lines) + "\n" + note + "\n"


def run_local(cfg: TrainConfig) -> dict:
    from recipes.fast_advprop import train

    if not cfg.run.compare:
        return train.main(cfg)
    cfgs = baselines(cfg)
    results = {label: train.main(c) for label, c in cfgs.items()}
    table = comparison_table(results, cfgs)
    Path(cfg.run.out_dir, "comparison.md").write_text(table)
    print("\n" + table)
    return {"results": results, "table": table}


def check(cfg: TrainConfig, world: int, *, files: bool = True) -> list[str]:
    """Raises ``ValueError`` (or ``FileNotFoundError``) for a config that cannot train with ``world`` processes.

    ``files=False`` (a dry run): a missing data path or file is not an error; what was not checked comes back.
    """
    from recipes.fast_advprop.train import validate

    return cli.check_runs(
        list(baselines(cfg).values()) if cfg.run.compare else [cfg], world, validate=validate, files=files
    )


def memory(cfg, world: int) -> list[str]:
    """The dry run's per-GPU memory estimate at ``data.img_size``."""
    return cli.memory_lines(
        cfg.model.name,
        [cfg.data.img_size],
        batch=cfg.data.batch_size,
        world=world,
        run=cfg.run,
        num_classes=cfg.model.num_classes,
    )


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse(argv)
    cli.main("fast_advprop", cfg, args, check=check, run_local=run_local, memory=memory)


if __name__ == "__main__":
    main()
