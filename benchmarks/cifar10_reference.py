"""CIFAR-10 adversarial-training reference through advtrain: PreAct ResNet-18, l_inf eps 8/255 (issue 10, item 3).

Claim: none recorded yet (written in a session without a GPU; the CPU smoke run below only shows that it runs).
Anchor from ``../shared/notes/gpu-measurements.md`` (a plain script, one H100, 2026-11-22): FGSM-RS 75.8% clean /
43.0% PGD-20 in 35 s of training; PGD-2 72.2% / 45.0% in 40 s. Target through the library: >= 80% clean and
>= 46% PGD-20 with <= 60 s of H100 training.

    python benchmarks/cifar10_reference.py --attack fgsm_rs            # one H100: ~1 min of training + evaluation
    python benchmarks/cifar10_reference.py --attack pgd2 --autoattack 1000
    python benchmarks/cifar10_reference.py --device cpu --limit 256 --epochs 1 --batch 64 --width 8 \\
        --eval-limit 64 --pgd-steps 2 --out /tmp/c10_smoke             # a smoke run of this script, not a result

Setup, as the anchor's: the whole decoded training set on the device as uint8; GPU-side random crop (pad 4,
reflect) and horizontal flip; bf16 autocast and channels_last for training; SGD (nesterov, momentum 0.9, weight
decay 5e-4) with a one-cycle learning rate (linear up to --lr over the first --warmup fraction, then linearly to 0);
the attack (``advtrain.fgsm`` with a random start, step 10/255, or ``advtrain.pgd`` with 2 steps of 5/255 by
default) on the model in train mode, as Wong et al. do. Evaluation in strict float32 (no autocast) on the test
set: clean top-1 and PGD-20 (step 2/255, random start), and optionally AutoAttack (standard, l_inf) on the first
--autoattack test images through ``advtrain.eval.autoattack``. Training time is measured with CUDA events around
the training loop only (data decoding and evaluation excluded), as the anchor's.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the checkout

from advtrain import fgsm, pgd  # noqa: E402
from advtrain.data import load_image_set  # noqa: E402

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
EPS = 8 / 255


# ------------------------------------------------------------------------------------------------ model


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        return self.conv2(F.relu(self.bn2(out))) + skip


class PreActResNet18(nn.Module):
    """He et al. (arXiv 1603.05027) for 32 px inputs, as in Wong et al. (arXiv 2001.03994); pixels in [0, 1] in."""

    def __init__(self, num_classes: int = 10, width: int = 64):
        super().__init__()
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        layers, cin = [], width
        for cout, stride in ((width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)):
            layers += [PreActBlock(cin, cout, stride), PreActBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.bn, self.fc = nn.BatchNorm2d(cin), nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(self.conv1((x - self.mean) / self.std))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1))


# ------------------------------------------------------------------------------------------------ data


def augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Random crop with 4 px reflect padding and horizontal flip, on the device, for a (B, 3, 32, 32) batch."""
    b, dev = x.shape[0], x.device
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dy = torch.randint(0, 9, (b, 1, 1, 1), device=dev, generator=g)
    dx = torch.randint(0, 9, (b, 1, 1, 1), device=dev, generator=g)
    ar = torch.arange(32, device=dev)
    out = padded[
        torch.arange(b, device=dev).view(b, 1, 1, 1),
        torch.arange(3, device=dev).view(1, 3, 1, 1),
        dy + ar.view(1, 1, 32, 1),
        dx + ar.view(1, 1, 1, 32),
    ]
    flip = torch.rand(b, device=dev, generator=g) < 0.5
    return torch.where(flip.view(b, 1, 1, 1), out.flip(3), out)


# ------------------------------------------------------------------------------------------------ train / eval


def train(args, model: nn.Module, xs: Tensor, ys: Tensor, device: torch.device) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps_per_epoch = xs.shape[0] // args.batch
    total = steps_per_epoch * args.epochs
    warm = max(1, int(args.warmup * total))
    g = torch.Generator(device=device).manual_seed(args.seed)
    match args.attack:
        case "fgsm_rs":
            attack = functools.partial(fgsm, eps=EPS, step_size=10 / 255, random_start=True, generator=g)
        case "pgd2":
            attack = functools.partial(pgd, eps=EPS, step_size=5 / 255, steps=2, generator=g)
        case "none":
            attack = None
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    model.train()
    start = time.perf_counter()
    if device.type == "cuda":
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
    step = 0
    for epoch in range(args.epochs):
        perm = torch.randperm(xs.shape[0], device=device, generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch : (i + 1) * args.batch]
            x = augment(xs[idx].float().div_(255), g).contiguous(memory_format=torch.channels_last)
            y = ys[idx]
            lr = args.lr * (step + 1) / warm if step < warm else args.lr * (total - step) / max(1, total - warm)
            for group in opt.param_groups:
                group["lr"] = lr
            with amp:
                if attack is not None:
                    x = attack(model, x, y)
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if args.verbose:
            print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.3f}", flush=True)
    if device.type == "cuda":
        t1.record()
        t1.synchronize()
        return t0.elapsed_time(t1) / 1e3
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model: nn.Module, xs: Tensor, ys: Tensor, batch: int, attack=None) -> float:
    correct = 0
    for i in range(0, xs.shape[0], batch):
        x, y = xs[i : i + batch].float() / 255, ys[i : i + batch]
        if attack is not None:
            x = attack(model, x, y)
        correct += int((model(x).argmax(1) == y).sum())
    return correct / xs.shape[0]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attack", choices=("fgsm_rs", "pgd2", "none"), default="fgsm_rs")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"))
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=0.2, help="peak of the one-cycle schedule")
    p.add_argument("--warmup", type=float, default=0.4, help="fraction of the steps spent ramping up")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images (smoke runs)")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test images")
    p.add_argument("--autoattack", type=int, default=0, help="AutoAttack (standard, l_inf) on the first N test images")
    p.add_argument("--width", type=int, default=64, help="channels of the first stage (64: PreAct ResNet-18)")
    p.add_argument("--pgd-steps", type=int, default=20, help="steps of the evaluation PGD (step 2/255)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/cifar10_<attack>)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.bf16 is None:
        args.bf16 = device.type == "cuda"
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    t = time.perf_counter()
    tr, te = (
        load_image_set(args.data, "train", limit=args.limit),
        load_image_set(args.data, "test", limit=args.eval_limit),
    )
    xs, ys = tr.images.to(device), tr.labels.to(device)
    xt, yt = te.images.to(device), te.labels.to(device)
    decode_s = time.perf_counter() - t
    model = PreActResNet18(width=args.width).to(device).to(memory_format=torch.channels_last)
    train_s = train(args, model, xs, ys, device)
    model.eval().float().to(memory_format=torch.contiguous_format)
    pgd20 = functools.partial(
        pgd, eps=EPS, step_size=2 / 255, steps=args.pgd_steps, generator=torch.Generator(device=device).manual_seed(1)
    )
    result = dict(
        attack=args.attack,
        epochs=args.epochs,
        batch=args.batch,
        lr=args.lr,
        train_images=xs.shape[0],
        test_images=xt.shape[0],
        train_seconds=round(train_s, 2),
        decode_seconds=round(decode_s, 2),
        clean=accuracy(model, xt, yt, 1000),
        pgd_steps=args.pgd_steps,
        pgd=accuracy(model, xt, yt, 500, pgd20),
    )
    if args.autoattack:
        from advtrain.eval import autoattack

        n = min(args.autoattack, xt.shape[0])
        with torch.enable_grad():
            x_aa = autoattack(model, xt[:n].float() / 255, yt[:n], norm="linf", eps=EPS)
        with torch.no_grad():
            result |= {"autoattack": float((model(x_aa).argmax(1) == yt[:n]).float().mean()), "autoattack_n": n}
    meta = dict(
        date=datetime.date.today().isoformat(),
        torch=torch.__version__,
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        command="python benchmarks/cifar10_reference.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    print(json.dumps(result | meta, indent=2))
    stem = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"cifar10_{args.attack}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"result": result, "meta": meta}, indent=2))
    return result


if __name__ == "__main__":
    main()
