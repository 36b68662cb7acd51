"""An ImageNet-style input pipeline with advtrain.data: shards, the standard transforms, resume, bad samples.

    python examples/imagenet_loader.py ../shared/datasets/imagenette224          # a folder with manifest.json
    python examples/imagenet_loader.py "/data/imagenet/train-{0000..1023}.tar"   # or any shard pattern / URL

Each DataLoader worker buffers ``shuffle_buffer`` encoded samples (1,000 ImageNet JPEGs ~ 110 MB) plus
``prefetch_factor`` decoded batches.
"""

from __future__ import annotations

import sys

import torch

from advtrain.data import (
    BadSampleBudget,
    ShardSource,
    check_sources,
    gather_loader_states,
    load_loader_state,
    make_loader,
    train_transform,
    val_transform,
)
from advtrain.training import StepTimer, cycle


def main(spec: str, steps: int = 20) -> None:
    split = {"split": "train"} if "{" not in spec and "://" not in spec else {}
    train = ShardSource(spec, transform=train_transform(size=112, randaugment="rand-m9-mstd0.5-inc1"), **split)
    val = (
        ShardSource(
            spec, split="val", transform=val_transform(size=112), epochs=1, shuffle_shards=False, shuffle_buffer=0
        )
        if split
        else None
    )
    check_sources({"train": train} | ({"val": val} if val else {}), world=1, num_workers=2)  # before training

    loader = make_loader(train, batch_size=64, seed=0, num_workers=2)
    budget = BadSampleBudget()  # stops the run past 0.1% bad samples, naming the worst shards
    timer, batches = StepTimer(torch.device("cpu")), cycle(loader)
    for step in range(steps):
        batch = timer.next(batches)  # times the wait for data
        budget.update(batch.bad, good=len(batch.keys))
        x = batch.images.float().div(255)  # (B, 3, 112, 112) in [0, 1]; the model normalizes
        timer.done(len(batch.keys))
        if step % 10 == 9:
            print({"step": step + 1, **timer.window(), **budget.metrics(), "mean": round(float(x.mean()), 3)})
    states = gather_loader_states(loader)  # every rank's state; rank 0 saves the list in its checkpoint
    resumed = make_loader(train, batch_size=64, seed=0, num_workers=2)
    load_loader_state(resumed, states)  # continues with the sample after the last one above
    print("resumed at", next(iter(resumed)).keys[:2])
    if val is not None:
        n = sum(len(b.keys) for b in make_loader(val, batch_size=100, seed=0, train=False))
        print("validation images:", n)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/datasets/imagenette224")
