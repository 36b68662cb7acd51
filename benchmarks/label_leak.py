"""Fast AdvProp's Fig. 2 question on a recipe run: does training top-1 on adversarial images exceed the clean one
without shuffle-BN (label leaking), and not with it?

Trains the Fast AdvProp recipe twice from the same seed, ``adv.shuffle_bn=false`` and ``true`` (nothing else
differs), and compares the per-pass training top-1 the recipe logs (``acc_clean``, ``acc_noisy``, ``acc_adv``,
averaged between metric lines). The numbers reported are means over the second half of training, and the final
clean / PGD evaluation.

    python benchmarks/label_leak.py                                   # embedded preset, CPU, about 3 min
    python benchmarks/label_leak.py --preset imagenette224            # the paper's per-GPU BN groups (GPU)
    python benchmarks/label_leak.py --preset cifar10 --set optim.epochs=20 --set data.num_workers=4

Writes ``benchmarks/results/label_leak_<preset>.{md,json,png}``; runs go to ``runs/label_leak/<preset>-*``
(deleted first: every call trains from scratch).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from at_step import cpu_name  # noqa: E402

from recipes.fast_advprop import train  # noqa: E402
from recipes.fast_advprop.config import override, preset  # noqa: E402

PASSES = ("clean", "noisy", "adv")


def second_half_means(rows: list[dict]) -> dict[str, float]:
    """Mean of each pass's logged training top-1 over the metric lines of the second half of training."""
    train_rows = [r for r in rows if r["kind"] == "train"]
    if not train_rows:
        raise ValueError("no training metric lines")
    last = train_rows[-1]["samples"]
    late = [r for r in train_rows if r["samples"] > last / 2] or train_rows[-1:]
    return {p: sum(r[f"acc_{p}"] for r in late) / len(late) for p in PASSES if f"acc_{p}" in late[0]}


def run_one(cfg, name: str) -> dict:
    run_dir = Path("runs/label_leak") / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = override(cfg, [f"run.out_dir={run_dir}"])
    t0 = time.perf_counter()
    out = train.main(cfg)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    final = out["evals"][-1] if out["evals"] else {}
    return {
        "train_top1": second_half_means(rows),
        "final_eval": {k: v for k, v in final.items() if k == "clean" or k.startswith("pgd")},
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": [r for r in rows if r["kind"] == "train"],
    }


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, (name, r) in zip(axes, results.items()):
        for p in PASSES:
            pts = [(x["samples"], 100 * x[f"acc_{p}"]) for x in r["rows"] if f"acc_{p}" in x]
            ax.plot(*zip(*pts), lw=1, label=p)
        ax.set(xlabel="samples seen", title=name)
        ax.legend()
    axes[0].set_ylabel("training top-1 (%)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="embedded")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override (repeatable)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for the table and plot")
    args = ap.parse_args(argv)
    base = override(preset(args.preset), [*args.set, "method=fast_advprop", "run.compare=false"])
    if base.adv.bn_groups == 1 and base.adv.shuffle_bn:
        print("note: adv.bn_groups=1 in one process: shuffle-BN has nothing to shuffle; the two runs will agree")
    torch.set_num_threads(base.run.threads or torch.get_num_threads())
    results = {}
    for shuffle in (False, True):
        name = f"{args.preset}-shuffle_bn={str(shuffle).lower()}"
        results[name] = run_one(override(base, [f"adv.shuffle_bn={str(shuffle).lower()}"]), name)
    a = base.adv
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name()
    lines = [
        f"# Label leaking and shuffle-BN: Fast AdvProp recipe, preset `{args.preset}`",
        "",
        f"Command: `python benchmarks/label_leak.py --preset {args.preset}"
        + "".join(f" --set {s}" for s in args.set)
        + "`",
        f"Date {time.strftime('%Y-%m-%d')}, device {device}, torch {torch.__version__}.",
        f"Batch {base.data.batch_size}, p_adv {a.p_adv}, PGD-{a.steps} eps {a.eps:.4g}, BN groups {a.bn_groups} "
        f"(attacked rows per group: {round(base.data.batch_size * a.p_adv) // a.bn_groups}).",
        "Training top-1: mean of the logged per-pass accuracies over the second half of training.",
        "",
        "| run | clean | noisy | adversarial | adv - clean | final eval | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        t = r["train_top1"]
        ev = ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["final_eval"].items())
        lines.append(
            f"| {name} | {100 * t['clean']:.1f} | {100 * t['noisy']:.1f} | {100 * t['adv']:.1f} | "
            f"{100 * (t['adv'] - t['clean']):+.1f} | {ev} | {r['seconds']} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"label_leak_{args.preset}"
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(
        json.dumps({k: {kk: vv for kk, vv in r.items() if kk != "rows"} for k, r in results.items()}, indent=2) + "\n"
    )
    plot(results, stem.with_suffix(".png"), f"Fast AdvProp, preset {args.preset}: training top-1 by pass")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
