"""Decode + augment throughput per CPU core: the recipes' old path vs advtrain.data, at 112 and 224 px.

Rows (each on one core: ``torch.set_num_threads(1)``, no DataLoader workers, the transform called in a loop):

- ``old``: what the recipes did before advtrain.data: Pillow decodes the full image, torchvision squash-resizes it
  to 224 x 224, then RandomResizedCrop (to 224 even for stage 1, which resized to 112 later, on the GPU), flip,
  RandAugment at 224;
- ``new (pillow)``: ``advtrain.data.train_transform``: the crop box is drawn on the header's dimensions, the JPEG
  is drafted (1/2, 1/4, 1/8) no further than the box still having ``size`` pixels per side, one resize of the box
  to ``size``, flip, RandAugment at ``size``;
- ``new (simplejpeg)``: the same with the ``fast`` extra's decoder (every M/8 DCT scale);
- ``new, through the loader``: the ``new`` transform inside ``ShardSource`` + ``make_loader`` (0 workers): tar
  reading, collate and bookkeeping included.

Each transform also runs with RandAugment off (``crop+flip``), and the decode alone is timed. Data: imagenette224's
validation JPEGs (224 x 224, quality 75: drafting rarely applies at 224 px), and "ImageNet-sized" synthetic JPEGs:
the same images upscaled to 500 x 375 and re-encoded at quality 90 in this script. Crop scale (0.35, 1), AdvXL's.
The quality column is the PSNR of the new output against the same crop box taken from the fully decoded image.

The GPU demand is AdvXL stage 1 on one H100, ~7,000 img/s, from ../shared/notes/gpu-measurements.md (an H100
measurement made with plain scripts before the library existed: 3,171 img/s compiled clean ViT-B/16 step, PGD-3 at
3.27x, stage 1 at 0.135x of a PGD-3 224 px step per image); cores needed = 7,000 / img/s per core.

    .venv/bin/python benchmarks/data_throughput.py --out benchmarks/results/data_throughput
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from advtrain.data import (
    ShardSource,
    decode_image,
    fast_decoder_available,
    iter_shard_samples,
    make_loader,
    train_transform,
)

GPU_IMG_PER_S = 7000  # AdvXL stage 1, one H100 (../shared/notes/gpu-measurements.md)
RANDAUG = "rand-m9-mstd0.5-inc1"
SCALE = (0.35, 1.0)


def old_transform(size: int, *, randaugment: bool):
    """The recipes' pre-library path (recipes/*/train.py before advtrain.data): squash to 224, then augment."""
    from torchvision.transforms import v2
    from torchvision.transforms.functional import resize

    from advtrain.data._transforms import _host_rng, rand_augment

    full = 224  # the recipes decoded and augmented at the run's full resolution, stage 1 included
    ra = rand_augment(RANDAUG, size=full) if randaugment else None
    crop = v2.RandomResizedCrop(full, scale=SCALE, antialias=True)

    def transform(data: bytes, g: torch.Generator) -> torch.Tensor:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
        x = resize(x, [full, full], antialias=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
            x = crop(x)
        if bool(torch.rand(1, generator=g) < 0.5):
            x = x.flip(-1)
        if ra is not None:
            with _host_rng(int(torch.randint(0, 2**31, (1,), generator=g))):
                x = torch.from_numpy(np.array(ra(Image.fromarray(x.permute(1, 2, 0).numpy())))).permute(2, 0, 1)
        return x

    return transform


def rate(fn, images: list[bytes], *, seconds: float, rounds: int) -> float:
    """Best-of-``rounds`` images per second of ``fn(data, generator)`` over the images (cycled, >= ``seconds``)."""
    best = 0.0
    for _ in range(rounds):
        n, t0 = 0, time.perf_counter()
        while True:
            for data in images:
                fn(data, torch.Generator().manual_seed(n))
                n += 1
            if time.perf_counter() - t0 >= seconds:
                break
        best = max(best, n / (time.perf_counter() - t0))
    return best


def loader_rate(urls: list[str], size: int, *, seconds: float, rounds: int, decoder: str) -> float:
    src = ShardSource(
        urls,
        transform=train_transform(size=size, scale=SCALE, randaugment=RANDAUG, decoder=decoder),
        shuffle_buffer=100,
    )
    best = 0.0
    for _ in range(rounds):
        it = iter(make_loader(src, batch_size=32, seed=0))
        next(it)  # opens the first shard
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            n += len(next(it).keys)
        best = max(best, n / (time.perf_counter() - t0))
    return best


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


def quality(images: list[bytes], size: int, decoder: str) -> float:
    """Mean PSNR (dB) of the drafted crop vs the same box from the full decode (RandAugment off)."""
    t = train_transform(size=size, scale=SCALE, decoder=decoder)
    vals = []
    for i, data in enumerate(images[:50]):
        full = Image.open(io.BytesIO(data)).convert("RGB")  # a PIL input is never drafted
        vals.append(psnr(t(data, torch.Generator().manual_seed(i)), t(full, torch.Generator().manual_seed(i))))
    finite = [v for v in vals if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("inf")


def synthetic(images: list[bytes], n: int) -> list[bytes]:
    """ImageNet-sized JPEGs: real images upscaled to 500 x 375 and re-encoded at quality 90."""
    out = []
    for data in images[:n]:
        img = Image.open(io.BytesIO(data)).convert("RGB").resize((500, 375), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "imagenette224"))
    p.add_argument("--images", type=int, default=100, help="images per set")
    p.add_argument("--seconds", type=float, default=3.0, help="minimum seconds per timed round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per row (the best is kept)")
    p.add_argument("--sizes", type=int, nargs="+", default=[112, 224])
    p.add_argument("--out", default=None, help="write <out>.md and <out>.json")
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        help="instead of measuring: the best of each row over these earlier runs' .json files",
    )
    args = p.parse_args(argv)
    if args.merge:
        result = merge([json.loads(Path(f).read_text()) for f in args.merge], argv)
        if args.out:
            Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=1))
            Path(args.out).with_suffix(".md").write_text(format_table(result))
        return result
    torch.set_num_threads(1)

    url = str(Path(args.data) / "val-0000.tar.gz")
    real = [s["jpg"] for s, _ in zip(iter_shard_samples(url), range(args.images))]
    sets = {"imagenette224 (224x224, q75)": real, "synthetic 500x375 q90": synthetic(real, args.images)}
    decoders = ["pillow"] + (["simplejpeg"] if fast_decoder_available() else [])
    kw = {"seconds": args.seconds, "rounds": args.rounds}
    rows = []
    for set_name, images in sets.items():
        dec = {d: rate(lambda b, g, d=d: decode_image(b, decoder=d), images, **kw) for d in decoders}
        for size in args.sizes:
            paths = {
                "old (full decode, squash to 224, augment at 224)": lambda ra, size=size: old_transform(
                    size, randaugment=ra
                )
            }
            for d in decoders:
                paths[f"new ({d})"] = lambda ra, d=d, size=size: train_transform(
                    size=size, scale=SCALE, randaugment=RANDAUG if ra else None, decoder=d
                )
            for name, make in paths.items():
                row = {
                    "images": set_name,
                    "size": size,
                    "path": name,
                    "decode_full_img_s": dec["pillow"] if name.startswith("old") else dec[name[5:-1]],
                    "crop_flip_img_s": rate(make(False), images, **kw),
                    "full_aug_img_s": rate(make(True), images, **kw),
                }
                row["cores_for_7000"] = GPU_IMG_PER_S / row["full_aug_img_s"]
                row["psnr_db"] = None if name.startswith("old") else quality(images, size, name[5:-1])
                rows.append(row)
                print(json.dumps(row), flush=True)
    loader_rows = []
    if Path(args.data, "val-0000.tar.gz").exists():
        urls = [str(Path(args.data) / f"val-000{i}.tar.gz") for i in range(2)]
        for size in args.sizes:
            for d in decoders:
                r = loader_rate(urls, size, decoder=d, **kw)
                loader_rows.append(
                    {
                        "images": "imagenette224 shards",
                        "size": size,
                        "path": f"new ({d}), loader",
                        "full_aug_img_s": r,
                        "cores_for_7000": GPU_IMG_PER_S / r,
                    }
                )
                print(json.dumps(loader_rows[-1]), flush=True)
    import PIL
    import timm

    meta = {
        "cpu": cpu_model(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "simplejpeg": _version("simplejpeg"),
        "threads": torch.get_num_threads(),
        "command": "python benchmarks/data_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "images_per_set": args.images,
        "seconds_per_round": args.seconds,
        "rounds_best_of": args.rounds,
        "gpu_img_per_s": GPU_IMG_PER_S,
    }
    result = {"meta": meta, "rows": rows, "loader_rows": loader_rows}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        out.with_suffix(".md").write_text(format_table(result))
    return result


def merge(runs: list[dict], argv) -> dict:
    """The best (highest img/s) of each row over several runs of the script (a busy machine only slows rows)."""

    def best(rows_per_run, key):
        out = []
        for rows in zip(*rows_per_run):
            top = max(rows, key=lambda r: r["full_aug_img_s"])
            merged = dict(top)
            for k in ("decode_full_img_s", "crop_flip_img_s", "full_aug_img_s"):
                if k in top:
                    merged[k] = max(r[k] for r in rows)
            merged["cores_for_7000"] = GPU_IMG_PER_S / merged["full_aug_img_s"]
            out.append(merged)
        return out

    meta = dict(runs[0]["meta"])
    meta["command"] = " ; ".join(r["meta"]["command"] for r in runs)
    meta["runs_best_of"] = len(runs)
    meta["dates"] = sorted({r["meta"]["date"] for r in runs})
    return {
        "meta": meta,
        "rows": best([r["rows"] for r in runs], "rows"),
        "loader_rows": best([r["loader_rows"] for r in runs], "loader_rows"),
    }


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return None


def format_table(result: dict) -> str:
    m = result["meta"]
    lines = [
        f"Per-core decode + augment throughput ({m['cpu']}, {m['date']}, torch {m['torch']}, Pillow {m['pillow']}, "
        f"simplejpeg {m['simplejpeg']}, timm {m['timm']}; 1 thread, best of {m['rounds_best_of']} rounds of >= "
        f"{m['seconds_per_round']} s"
        + (
            f", best of {m['runs_best_of']} runs of the script per column (a busy shared "
            f"machine: other jobs only slow a row down)"
            if m.get("runs_best_of")
            else ""
        )
        + f"; `{m['command']}`).",
        "",
        (
            "Cores per GPU = 7,000 img/s (AdvXL stage 1 on one H100, ../shared/notes/gpu-measurements.md, measured "
            "before the library existed) / full-augmentation img/s per core. "
            "PSNR: new output vs the same crop from the "
            "full decode (RandAugment off)."
        ),
        "",
        "| images | px | path | decode only img/s | crop+flip img/s | + RandAugment img/s | cores per GPU | PSNR dB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        q = "-" if r["psnr_db"] is None else ("identical" if math.isinf(r["psnr_db"]) else f"{r['psnr_db']:.1f}")
        lines.append(
            f"| {r['images']} | {r['size']} | {r['path']} | {r['decode_full_img_s']:.0f} | "
            f"{r['crop_flip_img_s']:.0f} | {r['full_aug_img_s']:.0f} | {r['cores_for_7000']:.1f} | {q} |"
        )
    for r in result["loader_rows"]:
        lines.append(
            f"| {r['images']} | {r['size']} | {r['path']} | - | - | {r['full_aug_img_s']:.0f} | "
            f"{r['cores_for_7000']:.1f} | - |"
        )
    lines.append("")
    lines.append(
        "A GPU decode path (torchvision.io.decode_jpeg on CUDA) is not part of advtrain.data and is not "
        "measured on a GPU."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
