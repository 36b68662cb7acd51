"""``python -m advtrain.eval``: robustness of any timm / open_clip / Python model to the RobustBench standard.

Reads a class folder or WebDataset shards through the model's own preprocessing, picks RobustBench's fixed
5,000-image ImageNet list (or a seeded stratified subset elsewhere), and runs :func:`advtrain.eval.robust_eval`:
clean top-1, PGD-K and AutoAttack for each norm and radius, in float32, with per-sample JSON lines, ``--resume``
and ranks from ``torchrun``. Writes ``report.json`` (everything needed to reproduce), ``report.md`` and, with
``--plot``, robust accuracy against eps.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata as _md
import json
import os
import platform
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from advtrain.eval._autoattack import _AA_ATTACKS, IMAGENET_EPS
from advtrain.eval._protocol import NORMS, EvalProtocol, RobustReport, eps_label, read_sample_log, robust_eval

DESCRIPTION = """Robustness of a timm, open_clip or Python model to the RobustBench standard.

Reads a class folder or WebDataset shards through the model's own preprocessing (timm's pretrained config:
input size, crop_pct, interpolation, mean, std; normalization inside the model, images in [0, 1]), evaluates
RobustBench's fixed 5,000-image list on ImageNet (a seeded subset stratified over classes elsewhere), and
reports clean top-1, PGD-K and AutoAttack top-1 for each norm and radius (default: l_inf 4/255, l_2 2, l_1 75),
always in float32 with autocast and TF32 off. Per-sample results go to OUT/samples.RANK.jsonl as they are
computed (--resume skips them); under torchrun the subset is split across ranks. OUT/report.json holds all
that is needed to reproduce the numbers; OUT/report.md the table; --plot NORM a PNG of accuracy against eps.
Bad input stops with one 'error:' line and exit status 2 before any attack runs."""

EXAMPLES = """examples:
  # RobustBench's ImageNet protocol (5,000 fixed images, AutoAttack standard, l_inf 4/255, l_2 2, l_1 75)
  python -m advtrain.eval --model vit_base_patch16_224.augreg_in21k_ft_in1k --pretrained --data /data/imagenet/val
  # a recipe checkpoint, l_inf only, PGD-20 and AutoAttack at three radii, a plot
  python -m advtrain.eval --model vit_small_patch16_224 --checkpoint runs/x/checkpoints/ckpt-00500000.pt \\
      --data /data/imagenet-wds --split val --eps linf=1/255,2/255,4/255 --plot linf --out eval-x
  # an open_clip model, zero-shot, on 8 GPUs
  torchrun --nproc-per-node 8 -m advtrain.eval --model open_clip:ViT-B-32 --pretrained laion2b_s34b_b79k \\
      --data /data/imagenet/val --resume
"""


def _fraction(text: str) -> float:
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"not a number: {text!r} (write 4/255 or 0.0157)") from None


def parse_eps(items: list[str] | None, norms: list[str] | None) -> dict[str, tuple[float, ...]]:
    """``["linf=1/255,4/255", "l2=2"]`` -> radii per norm; no items: :data:`IMAGENET_EPS` of ``norms``.

    Example:
        >>> parse_eps(["linf=4/255,8/255", "l1=75"], None)
        {'linf': (0.01568627450980392, 0.03137254901960784), 'l1': (75.0,)}
    """
    if not items:
        norms = norms or list(NORMS)
        bad = [n for n in norms if n not in NORMS]
        if bad:
            raise ValueError(f"unknown norm(s) {bad}; expected some of {list(NORMS)}")
        return {n: (IMAGENET_EPS[n],) for n in norms}
    out: dict[str, tuple[float, ...]] = {}
    for item in items:
        norm, sep, values = item.partition("=")
        if not sep or norm not in NORMS:
            raise ValueError(f"--eps takes NORM=R1,R2 with NORM one of {list(NORMS)}; got {item!r}")
        if norm in out:
            raise ValueError(f"--eps names {norm} twice")
        out[norm] = tuple(_fraction(v) for v in values.split(",") if v.strip())
    if norms and set(norms) != set(out):
        raise ValueError(f"--norms {norms} and the norms of --eps {list(out)} differ: give one of them")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m advtrain.eval",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m = p.add_argument_group("model")
    m.add_argument(
        "--model",
        required=True,
        help="a timm name (resnet50.a1_in1k), open_clip:NAME (or open_clip:"
        "config.json), or a Python factory package.module:function",
    )
    m.add_argument(
        "--pretrained",
        nargs="?",
        const=True,
        default=None,
        metavar="TAG",
        help="timm: the name's pretrained weights; open_clip: a pretrained tag or file",
    )
    m.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="a state dict, a recipe checkpoint {'model': ...}, or a dict "
        "under 'state_dict'; wrapper prefixes stripped; loaded weights_only, strict",
    )
    m.add_argument("--checkpoint-key", metavar="KEY", help="the checkpoint entry holding the weights, e.g. ema")
    m.add_argument("--random-init", action="store_true", help="no weights (for tests)")
    m.add_argument(
        "--num-classes",
        type=int,
        help="timm head size (default: the data's class count with "
        "--checkpoint / --random-init, the pretrained head with --pretrained)",
    )
    m.add_argument("--model-kwargs", default="{}", metavar="JSON", help="extra create_model / factory arguments")
    m.add_argument("--class-names", metavar="FILE", help="open_clip: one class name per line, in label order")
    m.add_argument(
        "--templates",
        choices=["openai", "simple", "caption"],
        default="openai",
        help="open_clip prompts: OpenAI's 80, the 7-prompt ensemble, or 'a photo of a {}.'",
    )
    d = p.add_argument_group("data")
    d.add_argument(
        "--data",
        required=True,
        help="a class folder (root/<class>/<img>; root/<split> when present) or "
        "WebDataset shards (a folder with manifest.json or *.tar, a pattern, a URL)",
    )
    d.add_argument("--data-kind", choices=["auto", "folder", "shards"], default="auto")
    d.add_argument("--split", default="val", help="the manifest's / folder's split")
    d.add_argument(
        "--imagenet-labels",
        action="store_true",
        help="map wnid class ids (n01440764...) to ImageNet-1k indices: a 1000-way model on a subset",
    )
    d.add_argument("--img-size", type=int, help="override the model's input size")
    d.add_argument("--crop-pct", type=float, help="override crop_pct (resize to size / crop_pct, center crop)")
    d.add_argument("--interpolation", choices=["bicubic", "bilinear", "nearest", "lanczos", "box", "hamming"])
    d.add_argument("--mean", help="override the normalization mean, e.g. 0.5,0.5,0.5")
    d.add_argument("--std", help="override the normalization std")
    d.add_argument("--train-size", action="store_true", help="use timm's train input size, not its test size")
    s = p.add_argument_group("subset")
    s.add_argument(
        "--subset",
        default="auto",
        metavar="KIND",
        help="robustbench (RobustBench's 5,000 ImageNet "
        "images), stratified (seeded, over classes), all, a FILE of keys, or auto (robustbench on "
        "ImageNet-1k validation data, stratified elsewhere)",
    )
    s.add_argument("--n", type=int, help="subset size (default 5000; robustbench: its first N)")
    s.add_argument("--subset-seed", type=int, default=0)
    a = p.add_argument_group("protocol")
    a.add_argument("--norms", help="comma-separated norms at RobustBench's ImageNet radii (default linf,l2,l1)")
    a.add_argument("--eps", nargs="+", metavar="NORM=R[,R...]", help="radii per norm, e.g. linf=2/255,4/255 l2=2")
    a.add_argument("--pgd-steps", type=int, default=20, help="PGD iterations (0: no PGD)")
    a.add_argument("--pgd-rel-step", type=float, default=0.25, help="PGD step as a fraction of eps (AdvXL: 1/4)")
    a.add_argument(
        "--autoattack",
        default="standard",
        help=f"standard, plus, rand, none, or a comma-separated custom list from {','.join(_AA_ATTACKS)}",
    )
    a.add_argument("--seed", type=int, default=0, help="PGD random starts and AutoAttack's seed")
    r = p.add_argument_group("run")
    r.add_argument("--out", help="output folder (default eval-<model>)")
    r.add_argument("--resume", action="store_true", help="continue in --out, skipping the samples already done")
    r.add_argument(
        "--batch-size",
        type=int,
        default=128,
        help="images per batch (AutoAttack's results depend on it; it is part of the record)",
    )
    r.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding threads")
    r.add_argument("--device", help="default: cuda:LOCAL_RANK when CUDA is there, else cpu")
    r.add_argument("--plot", metavar="NORM", help="draw robust accuracy against eps for this norm (a PNG)")
    r.add_argument("--log-every", type=int, help="print a summary line every N batches (SLURM logs)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# ------------------------------------------------------------------------------------------------ helpers


def _floats(text: str | None, name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    vals = tuple(_fraction(v) for v in text.split(","))
    if len(vals) not in (1, 3):
        raise ValueError(f"{name} takes 1 or 3 comma-separated values; got {text!r}")
    return vals * 3 if len(vals) == 1 else vals


def _protocol(args) -> EvalProtocol:
    norms = [n.strip() for n in args.norms.split(",")] if args.norms else None
    eps = parse_eps(args.eps, norms)
    aa: Any = args.autoattack
    if aa == "none":
        aa = None
    elif aa not in ("standard", "plus", "rand"):
        aa = tuple(a.strip() for a in aa.split(","))
    return EvalProtocol(
        eps=eps,
        pgd_steps=args.pgd_steps,
        pgd_rel_step=args.pgd_rel_step if args.pgd_steps else None,
        autoattack=aa,
        seed=args.seed,
    )


def _dist() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        torch.distributed.init_process_group(backend=backend)
    return rank, world, local


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in (
        "torch",
        "torchvision",
        "timm",
        "open_clip_torch",
        "pyautoattack",
        "numpy",
        "pillow",
        "webdataset",
        "advtrain",
    ):
        try:
            out[pkg] = _md.version(pkg)
        except _md.PackageNotFoundError:
            out[pkg] = None
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if rev.returncode == 0:
            out["advtrain_git"] = rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _class_names(args, index, label_map) -> list[str] | None:
    if args.class_names:
        path = Path(args.class_names)
        if not path.is_file():
            raise FileNotFoundError(f"--class-names file {args.class_names!r} does not exist")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not args.model.startswith("open_clip:"):
        return None
    import open_clip

    from advtrain.eval._evaldata import imagenet_label_map

    if label_map is not None:
        return list(open_clip.IMAGENET_CLASSNAMES)
    if index.classes and all(c.startswith("n") and c[1:].isdigit() for c in index.classes):
        return [open_clip.IMAGENET_CLASSNAMES[i] for i in imagenet_label_map(index.classes)]
    if index.class_names:
        return list(index.class_names)
    if index.classes:
        return [c.replace("_", " ") for c in index.classes]
    raise ValueError("no class names in the data (no manifest class_names, no class folders): give --class-names")


def _templates(choice: str):
    import open_clip

    from advtrain.losses import CAPTION_TEMPLATES, IMAGENET_TEMPLATES

    return {
        "openai": list(open_clip.OPENAI_IMAGENET_TEMPLATES),
        "simple": list(IMAGENET_TEMPLATES),
        "caption": list(CAPTION_TEMPLATES),
    }[choice]


def _choose(args, index, labels: list[int]) -> tuple[list[int], dict]:
    from timm.data import ImageNetInfo

    from advtrain.eval._subset import (
        ROBUSTBENCH_IMAGENET_FILE,
        ROBUSTBENCH_IMAGENET_SHA256,
        imagenet_val_id,
        robustbench_subset,
        stratified_subset,
    )

    keys = [s.key for s in index.samples]
    kind = args.subset
    if kind == "auto":
        imagenet = (
            index.classes == list(ImageNetInfo().label_names())
            and sum(imagenet_val_id(k) is not None for k in keys) >= 5000
        )
        kind = "robustbench" if imagenet else "stratified"
    if args.n is not None and args.n < 1:
        raise ValueError(f"--n must be >= 1; got {args.n}")
    match kind:
        case "robustbench":
            idx = robustbench_subset(keys, labels, n=args.n)
            meta = {
                "kind": "robustbench",
                "list": "RobustBench 1.1.1 helper_files/imagenet_test_image_ids.txt",
                "list_file": str(ROBUSTBENCH_IMAGENET_FILE.name),
                "list_sha256": ROBUSTBENCH_IMAGENET_SHA256,
            }
        case "stratified":
            idx = stratified_subset(keys, labels, n=args.n or 5000, seed=args.subset_seed)
            meta = {"kind": "stratified", "seed": args.subset_seed, "requested": args.n or 5000}
        case "all":
            idx = list(range(len(keys)))
            meta = {"kind": "all"}
        case _:
            path = Path(kind)
            if not path.is_file():
                raise FileNotFoundError(
                    f"--subset {kind!r}: no such subset list (robustbench, stratified, all, auto, or a file of keys)"
                )
            wanted = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
            where = {k: i for i, k in enumerate(keys)}
            missing = [k for k in wanted if k not in where]
            if missing:
                raise ValueError(
                    f"{len(missing)} of the {len(wanted)} keys in {kind} are not in the data, e.g. {missing[:3]}"
                )
            idx = [where[k] for k in wanted][: args.n or len(wanted)]
            from advtrain.models import file_sha256

            meta = {"kind": "file", "file": str(path), "file_sha256": file_sha256(path)}
    return idx, meta


def _plot(report: RobustReport, norm: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = [a for a in report.attacks if a.norm == norm]
    if not specs:
        raise ValueError(f"--plot {norm}: the protocol evaluates no {norm} attack")
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for kind in dict.fromkeys(a.kind for a in specs):
        pts = sorted((a.eps, 100 * report.robust[a.name]) for a in specs if a.kind == kind)
        label = f"PGD-{specs[0].steps}" if kind == "pgd" else "AutoAttack"
        ax.plot([0.0] + [e for e, _ in pts], [100 * report.clean] + [v for _, v in pts], marker="o", label=label)
    ticks = sorted({a.eps for a in specs})
    ax.set_xticks([0.0] + ticks, ["0"] + [eps_label(norm, e) for e in ticks])
    ax.set_xlabel(f"{norm} radius")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"robust accuracy vs {norm} radius ({report.n} images)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main


def run(args) -> dict:
    """The command without the exit-code handling; returns the report JSON (on every rank)."""
    from advtrain.eval._evaldata import eval_transform, imagenet_label_map, index_data, iter_image_batches
    from advtrain.eval._evalmodel import Preprocess, _parse_spec, build_model, with_normalization
    from advtrain.eval._subset import split_for_rank, subset_digest

    started = time.time()
    protocol = _protocol(args)  # cheap checks first: radii, attack names
    if args.plot and args.plot not in protocol.eps:
        raise ValueError(f"--plot {args.plot}: the protocol evaluates no {args.plot} attack ({list(protocol.eps)})")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {args.batch_size}")
    try:
        kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as err:
        raise ValueError(f"--model-kwargs is not JSON: {err}") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--model-kwargs must be a JSON object; got {args.model_kwargs!r}")
    mean, std = _floats(args.mean, "--mean"), _floats(args.std, "--std")
    out = Path(args.out or f"eval-{args.model.replace('/', '_').replace(':', '_')}")
    rank, world, local = _dist()
    device = torch.device(args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))

    # ---- data listing (no images decoded yet)
    if rank == 0:
        index = index_data(args.data, kind=args.data_kind, split=args.split, cache=out / "index.json")
    _barrier(world)
    if rank != 0:
        index = index_data(args.data, kind=args.data_kind, split=args.split, cache=out / "index.json")
    label_map = None
    data_classes = index.num_classes
    if args.imagenet_labels:
        if index.classes is None:
            raise ValueError("--imagenet-labels needs class ids (class folders or a manifest's classes)")
        label_map = imagenet_label_map(index.classes)
        data_classes = 1000
    labels = [label_map[s.label] if label_map else s.label for s in index.samples]

    # ---- model
    kind = _parse_spec(args.model)[0]
    num_classes = args.num_classes
    if num_classes is None and kind == "timm" and not args.pretrained:
        num_classes = data_classes  # a checkpoint's head: a mismatch is reported by the strict load
    if num_classes is not None and kind != "timm":
        raise ValueError(f"--num-classes is for timm models; {args.model!r} is a {kind} model")
    built = build_model(
        args.model,
        pretrained=args.pretrained,
        checkpoint=args.checkpoint,
        checkpoint_key=args.checkpoint_key,
        random_init=args.random_init,
        num_classes=num_classes,
        kwargs=kwargs,
        class_names=_class_names(args, index, label_map),
        templates=_templates(args.templates) if kind == "open_clip" else None,
        use_test_size=not args.train_size,
    )
    pre = built.preprocess
    pre = Preprocess(
        args.img_size or pre.size,
        args.crop_pct or pre.crop_pct,
        args.interpolation or pre.interpolation,
        mean or pre.mean,
        std or pre.std,
        pre.source
        + (
            "; overridden: "
            + ", ".join(
                k
                for k, v in (
                    ("size", args.img_size),
                    ("crop_pct", args.crop_pct),
                    ("interpolation", args.interpolation),
                    ("mean", mean),
                    ("std", std),
                )
                if v
            )
            if any((args.img_size, args.crop_pct, args.interpolation, mean, std))
            else ""
        ),
    )
    if pre.size < 1:
        raise ValueError(f"the input size is unknown ({pre.source})")
    model = with_normalization(built.model, pre).to(device)
    with torch.no_grad():
        k = int(model(torch.zeros(1, 3, pre.size, pre.size, device=device)).shape[1])
    if k != data_classes:
        raise ValueError(
            f"the model has {k} outputs but the data has {data_classes} classes"
            + (" (try --imagenet-labels for wnid classes)" if k == 1000 and index.classes else "")
        )
    protocol.check_input((3, pre.size, pre.size))

    # ---- subset, resume
    idx, subset_meta = _choose(args, index, labels)
    chosen = [index.samples[i] for i in idx]
    keys = [s.key for s in chosen]
    subset_meta |= {"n": len(chosen), "sha256": subset_digest(keys), "first_keys": keys[:5]}
    fingerprint = {
        "model": {
            k: v
            for k, v in built.info.items()
            if k in ("kind", "name", "pretrained", "checkpoint_key", "kwargs", "weights_sha256")
        },
        "preprocess": pre._asdict() | {"source": None},
        "data": {"path": str(args.data), "split": args.split, "imagenet_labels": bool(label_map)},
        "subset": {k: subset_meta[k] for k in ("kind", "n", "sha256")},
        "protocol": protocol.to_dict(),
        "batch_size": args.batch_size,
    }
    sample_files = sorted(out.glob("samples.*.jsonl"))
    done: dict[str, dict] = {}
    if (out / "run.json").exists() or sample_files:
        if not args.resume:
            raise ValueError(f"{out} already holds an evaluation: pass --resume to continue it, or another --out")
        old = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
        diff = sorted(
            k
            for k in fingerprint
            if json.dumps(old.get(k), sort_keys=True)
            != json.dumps(json.loads(json.dumps(fingerprint[k])), sort_keys=True)
        )
        if diff:
            raise ValueError(f"cannot resume {out}: {', '.join(diff)} differ from the run there (see {out}/run.json)")
        done = {k: v for k, v in read_sample_log(sample_files).items() if k in set(keys)}
    _barrier(world)  # every rank has read the same done set before any rank writes
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text(json.dumps(fingerprint, indent=1))
    pending = [s for s in chosen if s.key not in done]
    mine = split_for_rank(pending, rank=rank, world=world)

    # ---- evaluation
    transform = eval_transform(size=pre.size, crop_pct=pre.crop_pct, interpolation=pre.interpolation)
    batches = iter_image_batches(
        index, mine, transform=transform, batch_size=args.batch_size, workers=args.workers, label_map=label_map
    )
    report = robust_eval(
        model,
        batches,
        protocol=protocol,
        num_classes=data_classes,
        results=out / f"samples.{rank}.jsonl",
        done=done,
        device=device,
        total=len(mine),
        progress=not args.no_progress and rank == 0,
        log_every=args.log_every,
        desc=f"eval {len(chosen)} images" + (f" (rank {rank}/{world})" if world > 1 else ""),
    )
    result = {
        "command": ["python", "-m", "advtrain.eval", *(sys.argv[1:] if args._argv is None else args._argv)],
        "model": built.info | {"num_classes": k},
        "data": {
            "path": str(args.data),
            "kind": index.kind,
            "split": args.split,
            "samples": len(index.samples),
            "classes": data_classes,
            "imagenet_labels": bool(label_map),
            "shards": len(index.urls),
            "preprocess": pre._asdict()
            | {
                "resize_shorter_to": int(pre.size / pre.crop_pct + 1e-9),
                "decode": "Pillow, full size",
                "normalization": "inside the model",
            },
        },
        "subset": subset_meta,
        "protocol": protocol.to_dict()
        | {"batch_size": args.batch_size, "dtype": "float32", "autocast": False, "tf32": False},
        "attack_versions": {
            "pyautoattack": _md.version("pyautoattack"),
            "pgd": "advtrain.attacks.pgd (random start, steps and step size above)",
        },
        "distributed": {"world_size": world},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor()})",
        "versions": _versions(),
        "results": report.to_dict(),
        "per_sample": sorted(p.name for p in out.glob("samples.*.jsonl")),
        "started": _dt.datetime.fromtimestamp(started, _dt.timezone.utc).isoformat(),
        "seconds": time.time() - started,
    }
    if rank == 0:
        (out / "report.json").write_text(json.dumps(result, indent=1))
        md = (
            f"# Robustness of {args.model}\n\n{report.table()}\n\n{report.n} images ({subset_meta['kind']} subset, "
            f"sha256 {subset_meta['sha256'][:12]}), float32, batch {args.batch_size}, seed {args.seed}, "
            f"pyautoattack {_md.version('pyautoattack')}.\n"
        )
        (out / "report.md").write_text(md)
        if args.plot:
            _plot(report, args.plot, out / f"robust_vs_eps_{args.plot}.png")
        print(report.table())
        print(f"\n{report.n} images, {report.resumed} resumed, {report.seconds:.1f} s; {out}/report.json")
    if world > 1:
        torch.distributed.destroy_process_group()
    return result


def main(argv: list[str] | None = None) -> int:
    """Runs the command; bad input exits with status 2 and one ``error:`` line (``ADVTRAIN_TRACEBACK=1``: raise)."""
    from advtrain.data import ShardReadError

    args = build_parser().parse_args(argv)
    args._argv = argv
    try:
        run(args)
    except (ValueError, TypeError, KeyError, FileNotFoundError, ShardReadError) as err:
        if os.environ.get("ADVTRAIN_TRACEBACK") == "1":
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"error: {' '.join(str(msg).split())}", file=sys.stderr)
        return 2
    return 0
