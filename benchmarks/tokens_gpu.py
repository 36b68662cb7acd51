"""Wall-clock of one PGD-1 adversarial training step of ViT-B/16 under each token reducer (AdvXL, issue #3).

Claim: none recorded yet. Run it on one GPU (written for one H100); it prints a markdown table and writes the
resolved config, the git revision, library versions, the device and every timing as JSON next to this file.

    .venv/bin/python benchmarks/tokens_gpu.py                 # ViT-B/16, batch 128, bf16 autocast, 7 reducers
    .venv/bin/python benchmarks/tokens_gpu.py --compile       # the same, each config's forward torch.compile-d
    .venv/bin/python benchmarks/tokens_gpu.py --device cpu --amp float32 --model vit_tiny_patch16_224 \\
        --batch 2 --warmup 1 --steps 1 --out /tmp/tokens_cpu.json   # a smoke run of this script, not a benchmark

One step, the same for every reducer (only the input size and the keep-indices change):
    x (B, 3, 224, 224) pixels -> resize_reduce to the config's size (resize configs)
    indices = sample_*_indices(...) once per batch (mask configs)
    x_adv = pgd(forward, x, y, eps=4/255, step_size=4/255, steps=1)  with forward = vit_forward_tokens(., indices)
    loss = cross_entropy(forward(x_adv), y); loss.backward(); AdamW step
under torch.autocast(bfloat16). Synthetic data already on the device: the step is timed, not the loader.
Timing: CUDA events around each step after `--warmup` untimed steps; the median of `--steps` is reported.
Forward FLOPs per image are counted by torch.utils.flop_counter on one image (fused attention off, so the
attention matmuls are counted).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import platform
import statistics
import subprocess
import time
from pathlib import Path

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from advtrain import cross_entropy, pgd
from advtrain.tokens import (
    block_shape,
    num_kept,
    resample_vit_,
    resize_reduce,
    sample_block_indices,
    sample_random_indices,
    vit_forward_tokens,
)

# ------------------------------------------------------------------------------------------ hyperparameters
MODEL = "vit_base_patch16_224"  # timm name, random init (timing does not depend on the weights)
FULL_PX = 224  # input side of the reference step, pixels
BATCH = 128  # images per step
WARMUP, STEPS = 10, 30  # untimed, then timed steps per config
EPS, STEP_SIZE = 4 / 255, 4 / 255  # PGD-1 radius and step, l_inf, pixels
LR, WEIGHT_DECAY = 1e-4, 0.05  # AdamW (the values do not change the time)
SEED = 0
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # normalization inside the attacked function (pixels in [0, 1])


@dataclasses.dataclass(frozen=True, kw_only=True)
class Reducer:
    name: str
    img_px: int  # side of the image the ViT sees, pixels
    keep_ratio: float  # fraction of patch tokens kept (1.0: no mask)
    mask: str  # "none", "random" or "block"


REDUCERS = (
    Reducer(name="full 224 px", img_px=224, keep_ratio=1.0, mask="none"),
    Reducer(name="random mask 50%", img_px=224, keep_ratio=0.5, mask="random"),
    Reducer(name="random mask 75%", img_px=224, keep_ratio=0.25, mask="random"),
    Reducer(name="block mask 50%", img_px=224, keep_ratio=0.5, mask="block"),
    Reducer(name="block mask 75%", img_px=224, keep_ratio=0.25, mask="block"),
    Reducer(name="resize 160 px", img_px=160, keep_ratio=1.0, mask="none"),
    Reducer(name="resize 112 px", img_px=112, keep_ratio=1.0, mask="none"),
)


# ------------------------------------------------------------------------------------------ one training step
def sample_indices(r: Reducer, batch: int, grid: tuple[int, int], generator: torch.Generator, device):
    match r.mask:
        case "none":
            return None
        case "random":
            return sample_random_indices(
                batch, grid[0] * grid[1], keep_ratio=r.keep_ratio, generator=generator, device=device
            )
        case "block":
            return sample_block_indices(batch, grid=grid, keep_ratio=r.keep_ratio, generator=generator, device=device)
    raise ValueError(f"unknown mask {r.mask!r}")


def make_step(model, opt, r: Reducer, *, forward_fn, generator, device, amp_dtype):
    patch = model.patch_embed.patch_size[0]
    grid = (r.img_px // patch, r.img_px // patch)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if r.img_px != x.shape[-1]:
            x = resize_reduce(x, r.img_px)  # the attack runs on the reduced input
        idx = sample_indices(r, x.shape[0], grid, generator, device)  # once per batch: attack and step share it

        def forward(z):
            return forward_fn(model, (z - mean) / std, indices=idx)

        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
            x_adv = pgd(forward, x, y, eps=EPS, step_size=STEP_SIZE, steps=1, generator=generator)
            loss = cross_entropy(forward(x_adv), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


# ------------------------------------------------------------------------------------------ measurement
def forward_gflops_per_image(model, r: Reducer, device) -> float:
    m = copy.deepcopy(model).eval()
    for block in m.blocks:
        block.attn.fused_attn = False  # count the attention matmuls too
    g = torch.Generator(device=device).manual_seed(SEED)
    x = torch.rand(1, 3, r.img_px, r.img_px, device=device)
    patch = m.patch_embed.patch_size[0]
    idx = sample_indices(r, 1, (r.img_px // patch, r.img_px // patch), g, device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        vit_forward_tokens(m, x, indices=idx)
    return counter.get_total_flops() / 1e9


def time_steps(step, x, y, *, warmup: int, steps: int, device) -> list[float]:
    """Milliseconds of each timed step (CUDA events on a GPU, perf_counter after a sync elsewhere)."""
    for _ in range(warmup):
        step(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            step(x, y)
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(x, y)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def run_one(base, r: Reducer, args, device, amp_dtype) -> dict:
    model = copy.deepcopy(base)
    if r.img_px != FULL_PX:
        resample_vit_(model, img_size=r.img_px)  # the same weights, run at r.img_px (before the optimizer)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=device.type == "cuda")
    forward_fn = torch.compile(vit_forward_tokens) if args.compile else vit_forward_tokens
    g = torch.Generator(device=device).manual_seed(SEED)
    x = torch.rand(args.batch, 3, FULL_PX, FULL_PX, generator=g, device=device)
    y = torch.randint(0, model.num_classes, (args.batch,), generator=g, device=device)
    step = make_step(model, opt, r, forward_fn=forward_fn, generator=g, device=device, amp_dtype=amp_dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms = time_steps(step, x, y, warmup=args.warmup, steps=args.steps, device=device)
    grid = r.img_px // model.patch_embed.patch_size[0]
    match r.mask:
        case "none":
            kept = grid * grid
        case "random":
            kept = num_kept(grid * grid, keep_ratio=r.keep_ratio)
        case "block":
            kept = math.prod(block_shape((grid, grid), keep_ratio=r.keep_ratio))
    return {
        "reducer": r.name,
        "img_px": r.img_px,
        "keep_ratio": r.keep_ratio,
        "mask": r.mask,
        "patch_tokens": kept,
        "prefix_tokens": model.num_prefix_tokens,
        "forward_gflops_per_image": forward_gflops_per_image(base if r.img_px == FULL_PX else model, r, device),
        "ms_per_step": ms,
        "ms_median": statistics.median(ms),
        "ms_mean": statistics.fmean(ms),
        "images_per_s": args.batch / (statistics.median(ms) / 1e3),
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


# ------------------------------------------------------------------------------------------ record
def environment(device) -> dict:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain"], capture_output=True, text=True, cwd=Path(__file__).parent
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        rev, dirty = None, None
    return {
        "git_revision": rev,
        "git_dirty": dirty,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def markdown(results: list[dict], batch: int) -> str:
    full = next((r["ms_median"] for r in results if r["reducer"].startswith("full")), None)
    full_flops = next((r["forward_gflops_per_image"] for r in results if r["reducer"].startswith("full")), None)
    lines = [
        f"| reducer | px | patch tokens | fwd GFLOPs/img | FLOPs vs full | ms/step (median, B={batch}) | img/s "
        "| time vs full | peak GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        rel = f"{r['ms_median'] / full:.2f}x" if full else "-"
        frel = f"{r['forward_gflops_per_image'] / full_flops:.2f}x" if full_flops else "-"
        lines.append(
            f"| {r['reducer']} | {r['img_px']} | {r['patch_tokens']} | {r['forward_gflops_per_image']:.1f} | {frel} "
            f"| {r['ms_median']:.1f} | {r['images_per_s']:.0f} | {rel} | {mem} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--warmup", type=int, default=WARMUP)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile", action="store_true", help="torch.compile vit_forward_tokens per config")
    parser.add_argument(
        "--amp",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="autocast dtype (float32: autocast off; only for smoke runs)",
    )
    parser.add_argument("--only", nargs="*", default=None, help="reducer names to run (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this is a GPU benchmark (use --device cpu only for a smoke run)")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(SEED)
    base = timm.create_model(args.model, pretrained=False).to(device)
    reducers = [r for r in REDUCERS if args.only is None or r.name in args.only]

    results = []
    for r in reducers:
        results.append(run_one(base, r, args, device, getattr(torch, args.amp)))
        print(f"{r.name}: {results[-1]['ms_median']:.1f} ms/step", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    table = markdown(results, args.batch)
    print()
    print(table)
    config = {
        "model": args.model,
        "full_px": FULL_PX,
        "batch": args.batch,
        "warmup": args.warmup,
        "steps": args.steps,
        "eps": EPS,
        "step_size": STEP_SIZE,
        "pgd_steps": 1,
        "amp": args.amp,
        "compile": args.compile,
        "lr": LR,
        "weight_decay": WEIGHT_DECAY,
        "seed": SEED,
        "reducers": [dataclasses.asdict(r) for r in reducers],
    }
    env = environment(device)
    out = args.out
    if out is None:
        stamp = env["date"].replace(":", "").replace("-", "")
        out = Path(__file__).parent / "results" / f"tokens_gpu-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": config, "environment": env, "results": results, "table": table}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
