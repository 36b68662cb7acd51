"""Cost of adversarial-training steps against the clean training step, with peak memory (not a test: prints a table).

One attack step is one forward and one input-only backward, ~2/3 of a training step (forward + backward for inputs
and weights), so PGD-K adversarial training costs about (2K + 3) / 3 clean steps: 1.67x for K = 1, 3.0x for K = 3.
A recycled ("free") step costs ~1x. This script measures, per model and in one process:

  clean         forward + backward + optimizer step
  pgd1, pgd3    advtrain.pgd (l_inf 4/255) then the training step on the adversarial batch; when compiled, the
                attack runs through ``torch.compile(advtrain.attacks.detach_params(model))``
  pgd3 via compiled model   the pitfall: the attack through the compiled *training* model, whose compiled
                backward also computes every weight gradient (compiled runs only)
  free          advtrain.recycled_step (one backward: weight and input gradients) + optimizer step
  stage1 112px  (ViTs) AdvXL's stage 1: PGD-1 at half resolution, batch x4; per-sample cost vs the 224 px PGD-3 step
  torchattacks  the peer: torchattacks.PGD-3 + training step, fp32 and under bf16 autocast (GPU)

Rows are timed round-robin (one step of each in turn, repeated) and each row's median step is reported, so load from
other processes and clock drift hit every row alike. Presets:

    python benchmarks/at_step.py --preset h100       # ViT-B/16 b128 224 px bf16 compiled; ResNet-50 b256 channels_last
    python benchmarks/at_step.py --preset cpu        # a small ViT and ResNet-18 at 64 px, fp32, eager, 1 thread
    python benchmarks/at_step.py --preset cpu --compile    # the same through torch.compile (slow to compile)

Results go to ``benchmarks/results/at_step_<preset>.{json,md}`` (``--out`` to change), with the device, torch
version, date and command.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the checkout

from advtrain import pgd, recycled_step  # noqa: E402
from advtrain.attacks import detach_params  # noqa: E402

EPS, ALPHA = 4 / 255, 1 / 255


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    label: str
    name: str  # timm name
    batch: int
    img_size: int
    kwargs: dict = dataclasses.field(default_factory=dict)
    channels_last: bool = False
    stage1_batch: int | None = None  # ViTs: AdvXL stage 1 at img_size // 2 with this batch


PRESETS = {
    "h100": dict(
        models=[
            ModelSpec("ViT-B/16", "vit_base_patch16_224", 128, 224, dict(dynamic_img_size=True), stage1_batch=512),
            ModelSpec("ResNet-50", "resnet50", 256, 224, channels_last=True),
        ],
        dtype="bf16",
        compile=True,
        iters=15,
        warmup=3,
        threads=None,
    ),
    "cpu": dict(
        models=[
            ModelSpec(
                "ViT-Ti/8 (4 blocks)",
                "vit_tiny_patch16_224",
                32,
                64,
                dict(patch_size=8, depth=4, img_size=64, dynamic_img_size=True),
                stage1_batch=128,
            ),
            ModelSpec("ResNet-18", "resnet18", 32, 64),
        ],
        dtype="fp32",
        compile=False,
        iters=7,
        warmup=2,
        threads=1,
    ),
}


# ------------------------------------------------------------------------------------------------ one step of each


def make_model(spec: ModelSpec, device: torch.device) -> nn.Module:
    import timm

    model = timm.create_model(spec.name, num_classes=1000 if spec.img_size >= 224 else 10, **spec.kwargs)
    model = model.to(device)
    if spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.train()


def autocast(dtype: str, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


def steps_for(spec: ModelSpec, args, device: torch.device) -> dict[str, Callable[[], None]]:
    """Closures, one per row, each running one full step on fixed random data."""
    model = make_model(spec, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    train_model = torch.compile(model) if args.compile else model
    attack_model = torch.compile(detach_params(model)) if args.compile else model
    g = torch.Generator(device=device).manual_seed(0)
    ncls = 1000 if spec.img_size >= 224 else 10

    def batch(b: int, size: int):
        x = torch.rand(b, 3, size, size, device=device, generator=g)
        if spec.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, torch.randint(0, ncls, (b,), device=device, generator=g)

    x, y = batch(spec.batch, spec.img_size)

    def train_step(xb, yb):
        with autocast(args.dtype, device):
            loss = nn.functional.cross_entropy(train_model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def attack(am, xb, yb, k):
        model.eval()  # attacks see the deterministic network, as in the AdvXL recipe
        with autocast(args.dtype, device):
            xa = pgd(am, xb, yb, eps=EPS, step_size=ALPHA, steps=k, generator=g)
        model.train()
        return xa

    rows = {
        "clean": lambda: train_step(x, y),
        "pgd1": lambda: train_step(attack(attack_model, x, y, 1), y),
        "pgd3": lambda: train_step(attack(attack_model, x, y, 3), y),
    }
    if args.compile:
        rows["pgd3 via compiled model"] = lambda: train_step(attack(train_model, x, y, 3), y)
    delta = {"d": torch.zeros_like(x)}

    def free():
        opt.zero_grad(set_to_none=True)
        with autocast(args.dtype, device):
            r = recycled_step(train_model, x, y, delta["d"], beta=1.0)
        opt.step()
        delta["d"] = (delta["d"] + ALPHA * r.grad.sign()).clamp(-EPS, EPS)

    rows["free"] = free
    if spec.stage1_batch:
        x1, y1 = batch(spec.stage1_batch, spec.img_size // 2)
        rows[f"stage1 {spec.img_size // 2}px pgd1 (batch {spec.stage1_batch})"] = lambda: train_step(
            attack(attack_model, x1, y1, 1), y1
        )
    try:
        import torchattacks
    except ImportError:
        print("torchattacks is not installed: no peer rows (pip install --no-deps torchattacks==3.5.1)")
    else:
        ta = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=3, random_start=True)

        def ta_step(dtype: str):
            def step():
                with autocast(dtype, device):
                    xa = ta(x, y)
                with autocast(dtype, device):
                    loss = nn.functional.cross_entropy(model(xa), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            return step

        rows["torchattacks pgd3 fp32"] = ta_step("fp32")
        if device.type == "cuda":
            rows["torchattacks pgd3 bf16"] = ta_step("bf16")
    return rows


# ------------------------------------------------------------------------------------------------ timing


def timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def peak_memory(fn: Callable[[], None], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) / 2**30


def floor_of(row: str) -> float | None:
    if row == "clean":
        return 1.0
    if row.startswith("pgd1"):
        return 5 / 3
    if row.startswith("pgd3") or row.startswith("torchattacks"):
        return 3.0
    if row == "free":
        return 1.0
    return None


def measure(spec: ModelSpec, args, device: torch.device) -> list[dict]:
    rows = steps_for(spec, args, device)
    print(f"{spec.label}: warming up {len(rows)} rows ({'compiling' if args.compile else 'eager'})...", flush=True)
    for fn in rows.values():
        for _ in range(args.warmup):
            fn()
    mem = {name: peak_memory(fn, device) for name, fn in rows.items()}
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.iters):
        for name, fn in rows.items():
            times[name].append(timed(fn, device))
    clean = statistics.median(times["clean"])
    out = []
    for name in rows:
        t = statistics.median(times[name])
        b = spec.stage1_batch if name.startswith("stage1") else spec.batch
        out.append(
            dict(
                model=spec.label,
                row=name,
                batch=b,
                img_size=spec.img_size // 2 if name.startswith("stage1") else spec.img_size,
                ms=1e3 * t,
                img_per_s=b / t,
                rel_clean=(t / b) / (clean / spec.batch),
                floor=floor_of(name),
                peak_gib=mem[name],
                rel_mem=mem[name] / mem["clean"] if mem[name] and mem["clean"] else None,
            )
        )
    if spec.stage1_batch:
        s1 = next(r for r in out if r["row"].startswith("stage1"))
        p3 = next(r for r in out if r["row"] == "pgd3")
        s1["per_sample_vs_pgd3"] = s1["rel_clean"] / p3["rel_clean"]
    return out


def cpu_name() -> str:
    try:
        names = [
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ]
    except OSError:
        names = []
    return f"{names[0] if names else platform.processor() or 'CPU'} ({len(names) or '?'} cores)"


def table(results: list[dict]) -> str:
    lines = [
        "| model | step | batch | px | img/s | cost vs clean (per image) | floor | peak mem (GiB) | mem vs clean |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        extra = f" ({r['per_sample_vs_pgd3']:.3f}x of pgd3 per image)" if "per_sample_vs_pgd3" in r else ""
        mem = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        relm = f"{r['rel_mem']:.2f}x" if r["rel_mem"] is not None else "-"
        fl = f"{r['floor']:.2f}x" if r["floor"] is not None else "-"
        lines.append(
            f"| {r['model']} | {r['row']} | {r['batch']} | {r['img_size']} | {r['img_per_s']:,.0f} | "
            f"{r['rel_clean']:.2f}x{extra} | {fl} | {mem} | {relm} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="h100")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: the preset's")
    p.add_argument("--iters", type=int, default=None, help="timed rounds (default: the preset's)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default: the preset's)")
    p.add_argument("--models", default=None, help="comma-separated subset of the preset's model labels' first words")
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/at_step_<preset>)")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    for key in ("compile", "iters", "warmup"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.dtype = preset["dtype"]
    if preset["threads"]:
        torch.set_num_threads(preset["threads"])
    device = torch.device("cuda" if args.preset != "cpu" else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--preset {args.preset} needs a CUDA GPU; use --preset cpu here")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    models = preset["models"]
    if args.models:
        wanted = {m.strip() for m in args.models.split(",")}
        models = [m for m in models if m.label.split()[0] in wanted]
    results = []
    for spec in models:
        results += measure(spec, args, device)
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    md = table(results)
    meta = dict(
        date=datetime.date.today().isoformat(),
        torch=torch.__version__,
        device=torch.cuda.get_device_name() if device.type == "cuda" else cpu_name(),
        threads=torch.get_num_threads(),
        compile=args.compile,
        dtype=args.dtype,
        iters=args.iters,
        command="python benchmarks/at_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    print(md)
    print(json.dumps(meta))
    stem = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"at_step_{args.preset}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": results}, indent=2))
    stem.with_suffix(".md").write_text(f"{md}\n{json.dumps(meta)}\n")
    return results


if __name__ == "__main__":
    main()
