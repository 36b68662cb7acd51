"""Per-step cost of Fast AdvProp against vanilla training and AdvProp on CPU (not a test: prints a table).

Every method runs the recipe's own ``train_step`` (recipes/fast_advprop/train.py) on the same random batch of B
images: vanilla (B clean), Fast AdvProp (p_adv = 0.2: 0.8 B clean + 0.2 B attacked with recycled PGD-1),
AdvProp PGD-1 and PGD-5 (B clean + B adversarial). Steps are timed round-robin (vanilla, fast, ...) and each
method's median is reported, so load from other processes hits every method alike. The paper's accounting
(Mei et al., ICLR 2022, Sec. 3) counts image forward/backward passes: 1 + p_adv K = 1.2x per step (hence per
epoch) for Fast AdvProp, K + 2 for AdvProp.

    python benchmarks/fast_advprop_cpu.py                          # resnet18, 64 px, batch 80, 1 thread
    python benchmarks/fast_advprop_cpu.py --model resnet50 --img-size 96 --batch 40 --steps 5
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the checkout

from recipes.fast_advprop import train  # noqa: E402
from recipes.fast_advprop.config import Data, TrainConfig, cost_per_epoch, preset, split_counts  # noqa: E402


def configs(args) -> dict[str, TrainConfig]:
    base = preset("embedded")
    base = dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, name=args.model, kwargs={}, num_classes=10),
        adv=dataclasses.replace(base.adv, p_adv=0.2, steps=1, bn_groups=args.bn_groups),
        data=Data(kind="digits", img_size=args.img_size, batch_size=args.batch, num_workers=0),
        eval=dataclasses.replace(base.eval, corruptions=()),
    )
    adv = base.adv
    return {
        "vanilla": dataclasses.replace(base, method="vanilla"),
        "Fast AdvProp (p_adv 0.2, PGD-1)": dataclasses.replace(base, method="fast_advprop"),
        "AdvProp PGD-1": dataclasses.replace(base, method="advprop", adv=dataclasses.replace(adv, advprop_steps=1)),
        "AdvProp PGD-5": dataclasses.replace(base, method="advprop", adv=dataclasses.replace(adv, advprop_steps=5)),
    }


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18", help="timm model name")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=80, help="images loaded per step (p_adv x batch must be whole)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    p.add_argument("--bn-groups", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfgs = configs(args)
    dd = train.Dist()
    g = torch.Generator().manual_seed(0)
    batch = [
        torch.randint(0, 256, (args.batch, 3, args.img_size, args.img_size), generator=g, dtype=torch.uint8),
        torch.randint(0, 10, (args.batch,), generator=g),
    ]
    state = {}
    for name, cfg in cfgs.items():
        train.validate(cfg)
        torch.manual_seed(0)
        model = train.build_model(cfg).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        state[name] = (cfg, model, opt, [])
    for i in range(args.warmup + args.steps):
        for cfg, model, opt, times in state.values():
            t0 = time.perf_counter()
            train.train_step(cfg, model, model, opt, batch, i, dd, None)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    ms = {name: 1000 * statistics.median(s[3]) for name, s in state.items()}
    lines = [
        f"{args.model}, {args.img_size} px, {args.batch} images / step, {args.threads} CPU thread(s), "
        f"BN groups {args.bn_groups}, median of {args.steps} steps ({torch.__version__}, "
        f"{torch.get_num_threads()} threads)",
        "",
        "| method | images / step (clean + attacked) | ms / step | measured x vanilla "
        "| passes x vanilla (accounting) |",
        "|---|---|---|---|---|",
    ]
    for name, (cfg, *_rest) in state.items():
        n_clean, n_adv = split_counts(cfg, args.batch)
        lines.append(
            f"| {name} | {n_clean} + {n_adv} | {ms[name]:.0f} | {ms[name] / ms['vanilla']:.2f} | "
            f"{cost_per_epoch(cfg):g} |"
        )
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
