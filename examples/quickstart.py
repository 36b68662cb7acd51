"""advtrain quickstart: standard vs PGD adversarial training on real handwritten digits, in seconds on a CPU.

Data: scikit-learn's bundled 8x8 digits (1,797 real scans, no download), pixels scaled to [0, 1].
Claim (2 CPU cores): both models train in a few seconds each; the PGD-trained model keeps far more accuracy
under a PGD-20 attack at eps = 0.1 than the standard one, at a small cost in clean accuracy.

    python examples/quickstart.py [--eps 0.1] [--epochs 30] [--seed 0]
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

from advtrain import pgd
from advtrain.eval import evaluate

# ------------------------------------------------------------------------------------------------ data


def digits(seed: int):
    """(x_train, y_train, x_test, y_test): (N, 1, 8, 8) float pixels in [0, 1], a fixed 75/25 split."""
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.75 * len(y))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def batches(x, y, size, generator=None):
    order = torch.randperm(len(y), generator=generator) if generator is not None else torch.arange(len(y))
    return [(x[order[i : i + size]], y[order[i : i + size]]) for i in range(0, len(y), size)]


# ------------------------------------------------------------------------------------------------ model


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 2 * 2, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


# ------------------------------------------------------------------------------------------------ training


def train(x, y, *, adversarial: bool, eps: float, epochs: int, seed: int) -> tuple[nn.Module, float]:
    torch.manual_seed(seed)
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        for xb, yb in batches(x, y, 64, g):
            if adversarial:  # PGD-5 inside the eps-ball; the attack leaves the model exactly as it found it
                xb = pgd(model, xb, yb, eps=eps, step_size=eps / 3, steps=5, generator=g)
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval(), time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eps", type=float, default=0.1, help="l_inf radius in pixels (images in [0, 1])")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)  # tiny convolutions: one thread is fastest, and robust to a busy machine

    x_tr, y_tr, x_te, y_te = digits(args.seed)
    print(f"sklearn digits: {len(y_tr)} train / {len(y_te)} test, 8x8 px; PGD-20 at eps {args.eps:.3f} (l_inf)")
    pgd20 = functools.partial(
        pgd, eps=args.eps, step_size=args.eps / 8, steps=20, generator=torch.Generator().manual_seed(args.seed)
    )
    rows = []
    for name, adversarial in [("standard", False), ("PGD-5 adversarial", True)]:
        model, seconds = train(x_tr, y_tr, adversarial=adversarial, eps=args.eps, epochs=args.epochs, seed=args.seed)
        r = evaluate(model, batches(x_te, y_te, 256), attacks={"pgd20": pgd20}, progress=False)
        rows.append((name, r.clean, r.robust["pgd20"], seconds))

    print("\n| training | clean acc (%) | PGD-20 acc (%) | train time (s) |\n|---|---|---|---|")
    for name, clean, robust, seconds in rows:
        print(f"| {name} | {100 * clean:.1f} | {100 * robust:.1f} | {seconds:.1f} |")
    gain = 100 * (rows[1][2] - rows[0][2])
    print(f"\nAdversarial training raised PGD-20 accuracy by {gain:.1f} points.")


if __name__ == "__main__":
    main()
