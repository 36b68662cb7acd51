"""Distribution-shift test sets read from folders: ImageNet-C (the official release), ImageNet-R, Stylized-ImageNet.

Each set is read by :class:`advtrain.data.ImageFolderSource` with the evaluation transform and the labels of the
model's classes (``classes``: the training data's wnids, e.g. :func:`imagenet_classes`), so a folder holding a
subset of the classes is scored against the right outputs. ImageNet-R holds 200 of the 1000 classes: its
prediction is the argmax over those 200 logits only, as the ImageNet-R authors' evaluation does. Without the
official ImageNet-C folders, :func:`shift_eval` falls back to regenerating the corruptions on the fly
(:func:`advtrain.eval.corruption_errors`) and labels the result as such.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from advtrain.eval._robust import eval_mode

log = logging.getLogger("advtrain.eval")

# AlexNet's top-1 error on the official ImageNet-C, averaged over severities 1-5, per corruption (the mCE's
# normalizer; Hendrycks & Dietterich, arXiv 1903.12261). Values as in hendrycks/robustness, copied from the
# ``ALEXNET_ERR`` constant of the AugMix ImageNet script (google-research/augmix ``imagenet.py``).
ALEXNET_ERRORS = {
    "gaussian_noise": 0.886428,
    "shot_noise": 0.894468,
    "impulse_noise": 0.922640,
    "defocus_blur": 0.819880,
    "glass_blur": 0.826268,
    "motion_blur": 0.785948,
    "zoom_blur": 0.798360,
    "snow": 0.866816,
    "frost": 0.826572,
    "fog": 0.819324,
    "brightness": 0.564592,
    "contrast": 0.853204,
    "elastic_transform": 0.646056,
    "pixelate": 0.717840,
    "jpeg_compression": 0.606500,
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".tif", ".tiff")


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1K wnids in the standard (sorted) label order, as timm ships them.

    Example:
        >>> c = imagenet_classes()
        >>> len(c), c[0], c == sorted(c)
        (1000, 'n01440764', True)
    """
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


def mean_corruption_error(errors: dict[str, Sequence[float]], severities: Sequence[int]) -> float | None:
    r"""ImageNet-C's mCE: each corruption's error (mean over severities 1-5) divided by AlexNet's, then averaged.

    .. math:: \mathrm{mCE} = \frac{1}{|C|} \sum_{c \in C}
        \frac{\frac15 \sum_{s=1}^{5} E_{s,c}}{\frac15 \sum_{s=1}^{5} E^{AlexNet}_{s,c}}

    Defined only over all five severities and corruptions with a published AlexNet error (the 15 types of
    :data:`ALEXNET_ERRORS`); otherwise None.

    Args:
        errors: ``{corruption: [top-1 error per severity]}`` in [0, 1].
        severities: the severities of those lists, in order.

    Returns:
        The mCE as a fraction (1.0: AlexNet's), or None.

    Example:
        >>> round(mean_corruption_error({"brightness": [0.564592] * 5}, (1, 2, 3, 4, 5)), 6)
        1.0
        >>> mean_corruption_error({"brightness": [0.5, 0.6]}, (1, 5)) is None
        True
    """
    if tuple(severities) != (1, 2, 3, 4, 5) or not errors or any(c not in ALEXNET_ERRORS for c in errors):
        return None
    return sum(sum(e) / len(e) / ALEXNET_ERRORS[c] for c, e in errors.items()) / len(errors)


# ------------------------------------------------------------------------------------------------ checks


def _class_dirs(root: Path, name: str) -> list[str]:
    try:
        dirs = sorted(e.name for e in os.scandir(root) if e.is_dir())
    except OSError as err:
        raise FileNotFoundError(f"{name}: cannot list {root}: {err}") from None
    if not dirs:
        raise ValueError(f"{name}: {root} holds no class folders (expected <wnid>/ folders of images)")
    return dirs


def check_class_folder(root: str | Path, *, classes: Sequence[str] | None, name: str) -> list[str]:
    """Checks ``root/<wnid>/<image>`` cheaply (no full listing): class folders, known classes, an image.

    Args:
        root: the set's folder.
        classes: the model's classes (wnids); None: not checked.
        name: the config key, for the messages.

    Returns:
        The class folder names (sorted).

    Raises:
        FileNotFoundError: ``root`` is missing.
        ValueError: no class folders, a class folder not among ``classes``, no image in the first class folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{name}: {str(root)!r} is not a folder")
    dirs = _class_dirs(root, name)
    if classes is not None:
        known = set(classes)
        unknown = [d for d in dirs if d not in known]
        if unknown:
            raise ValueError(
                f"{name}: {len(unknown)} of {len(dirs)} class folders of {root} are not among the model's "
                f"{len(known)} classes (e.g. {unknown[:3]})"
            )
    with os.scandir(root / dirs[0]) as it:
        if not any(e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) for e in it):
            raise ValueError(f"{name}: {root / dirs[0]} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    return dirs


def check_imagenet_c(
    root: str | Path, *, corruptions: Sequence[str], severities: Sequence[int], classes: Sequence[str] | None, name: str
) -> None:
    """Checks the official ImageNet-C layout ``root/<corruption>/<severity>/<wnid>/<image>`` for the listed pairs.

    Raises:
        FileNotFoundError: ``root`` is missing.
        ValueError: missing corruption or severity folders (all of them named), or a malformed class folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{name}: {str(root)!r} is not a folder")
    if not corruptions or not severities:
        raise ValueError(f"{name}: no corruptions or severities to read")
    missing = [f"{c}/{s}" for c in corruptions for s in severities if not (root / c / str(s)).is_dir()]
    if missing:
        raise ValueError(
            f"{name}: {len(missing)} <corruption>/<severity> folders missing under {root} (e.g. {missing[:4]}); "
            f"expected the official layout <root>/<corruption>/<1..5>/<wnid>/*.JPEG"
        )
    for c in corruptions:
        for s in severities:
            check_class_folder(root / c / str(s), classes=classes, name=name)


def model_classes(data, *, num_classes: int) -> list[str] | None:
    """A run's class ids in label order, from its ``data`` section (:class:`advtrain.data.DataConfig`).

    ``folder``: the sorted class folders of ``path/train_split`` (ImageNet's wnids); ``wds``: a shard folder's
    ``manifest.json`` ``classes``; otherwise, for a 1000-class model, ImageNet-1K's wnids
    (:func:`imagenet_classes`); else None (digits, shards without a manifest).

    Raises:
        ValueError: the listed classes are not ``num_classes`` many.
    """
    import json

    classes = None
    path = Path(data.path) if getattr(data, "path", None) else None
    if data.kind == "folder" and path is not None and (path / data.train_split).is_dir():
        classes = sorted(e.name for e in os.scandir(path / data.train_split) if e.is_dir())
    elif data.kind == "wds" and path is not None and (path / "manifest.json").is_file():
        classes = json.loads((path / "manifest.json").read_text()).get("classes")
    if classes is None and num_classes == 1000:
        classes = imagenet_classes()
    if classes is not None and len(classes) != num_classes:
        raise ValueError(f"the training data lists {len(classes)} classes but model.num_classes is {num_classes}")
    return None if classes is None else [str(c) for c in classes]


def check_corruption_names(corruptions: Sequence[str], *, key: str = "corruptions") -> None:
    """The on-the-fly fallback's needs: the imagecorruptions library (extra ``advtrain[corruptions]``) and names
    it knows.

    Raises:
        ValueError: the library is missing (naming the extra), or unknown names (listing the known ones).
    """
    try:
        from imagecorruptions import get_corruption_names
    except ImportError as err:
        raise ValueError(
            f"{key} needs the imagecorruptions library (pip install 'advtrain[corruptions]'), or set {key}=[]: {err}"
        ) from None
    unknown = sorted(set(corruptions) - set(get_corruption_names("all")))
    if unknown:
        raise ValueError(f"unknown corruptions {unknown}; choose from {get_corruption_names('all')}")


def check_shift_sets(
    *,
    classes: Sequence[str] | None,
    corruptions: Sequence[str],
    severities: Sequence[int],
    imagenet_c: str | None = None,
    imagenet_r: str | None = None,
    stylized: str | None = None,
    prefix: str = "",
) -> None:
    """Before training: every folder set :func:`shift_eval` will read, checked in seconds (no full listing).

    Args:
        classes: the model's classes (:func:`model_classes`).
        corruptions, severities: the ImageNet-C pairs.
        imagenet_c, imagenet_r, stylized: the folders (None: not used).
        prefix: the config section, for the messages (``"eval."``).

    Raises:
        FileNotFoundError: a missing folder.
        ValueError: a malformed folder, folders without known classes, ImageNet-C without corruptions; without
            ``imagenet_c``, what :func:`check_corruption_names` raises (the on-the-fly fallback).
    """
    if corruptions and not imagenet_c:
        check_corruption_names(corruptions, key=f"{prefix}corruptions")
    given = {k: v for k, v in (("imagenet_c", imagenet_c), ("imagenet_r", imagenet_r), ("stylized", stylized)) if v}
    if given and classes is None:
        raise ValueError(
            f"{', '.join(prefix + k for k in given)} need the model's classes as wnids: train on class folders, on "
            f"shards whose manifest.json lists 'classes', or with 1000 classes (ImageNet-1K's order)"
        )
    if imagenet_c:
        if not corruptions:
            raise ValueError(f"{prefix}imagenet_c is set but {prefix}corruptions is empty: nothing to read")
        check_imagenet_c(
            imagenet_c, corruptions=corruptions, severities=severities, classes=classes, name=f"{prefix}imagenet_c"
        )
    if imagenet_r:
        check_class_folder(imagenet_r, classes=classes, name=f"{prefix}imagenet_r")
    if stylized:
        check_class_folder(stylized, classes=classes, name=f"{prefix}stylized")


# ------------------------------------------------------------------------------------------------ scoring


def folder_error(
    model: nn.Module,
    source,
    *,
    mask: Sequence[int] | None = None,
    samples: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
    desc: str = "eval",
) -> tuple[float, int]:
    r"""Top-1 error of ``model`` on a labelled map-style source, optionally with the outputs restricted to a mask.

    .. math:: \hat y = m_{\arg\max_j f(x)_{m_j}}\ \text{(with a mask } m\text{)},\qquad
        \hat y = \arg\max_k f(x)_k\ \text{(without)}

    The model runs in eval mode (restored after) without gradients; the caller chooses autocast.

    Args:
        model: ``(B, 3, H, W)`` images in [0, 1] -> ``(B, K)`` logits.
        source: an :class:`advtrain.data.ImageFolderSource` (or any map-style source) whose labels index the
            model's outputs.
        mask: the output indices a prediction may take (ImageNet-R: its 200 classes); None: all.
        samples: a seeded subset of this many samples (sorted indices); None: all.
        seed: the subset's seed.
        batch_size, num_workers: of the loader.
        device: where the model runs.
        progress: a tqdm bar named ``desc``.

    Returns:
        ``(error in [0, 1], samples scored)``.

    Raises:
        ValueError: an empty source.
    """
    from tqdm.auto import tqdm

    from advtrain.data import collate

    n = len(source)
    if n == 0:
        raise ValueError(f"{desc}: no samples to evaluate")
    idx = list(range(n))
    if samples is not None and samples < n:
        idx = sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:samples].tolist())
    loader = DataLoader(Subset(source, idx), batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    keep = None if mask is None else torch.as_tensor(list(mask), dtype=torch.int64)
    wrong, bad = 0, 0
    with eval_mode(model), torch.no_grad():
        for b in tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True, disable=not progress):
            out = model(b.images.to(device).float().div_(255)).float().cpu()
            pred = out.argmax(1) if keep is None else keep[out[:, keep].argmax(1)]
            wrong += int((pred != b.labels).sum())
            bad += len(b.bad)
    if bad:
        log.warning("%s: %d unreadable image(s) were replaced by the next readable one", desc, bad)
    return wrong / len(idx), len(idx)


def _source(root, *, classes, size: int, crop_pct: float, interpolation: str):
    from advtrain.data import ImageFolderSource, val_transform

    t = val_transform(size=size, crop_pct=crop_pct, interpolation=interpolation)
    return ImageFolderSource(root, transform=t, classes=classes)


def imagenet_c_errors(
    model: nn.Module,
    root: str | Path,
    *,
    classes: Sequence[str],
    corruptions: Sequence[str],
    severities: Sequence[int],
    size: int = 224,
    interpolation: str = "bicubic",
    samples: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict:
    r"""Top-1 error on the official ImageNet-C folders ``root/<corruption>/<severity>/<wnid>/*.JPEG``, mean and mCE.

    The release's images are already 224 px center crops: they are resized (shorter side to ``size``) and
    center-cropped with ``crop_pct = 1``, which leaves 224 px images unchanged at ``size = 224``.

    Args:
        model: images in [0, 1] -> logits over ``classes``.
        root: the ImageNet-C folder.
        classes: the model's classes (wnids), in output order.
        corruptions, severities: the folders to read.
        size, interpolation: the evaluation resolution and filter.
        samples: a seeded subset of each (corruption, severity) folder (the same files in each, as the release
            holds the same images under every folder); None: all 50,000.
        seed: that subset's seed.
        batch_size, num_workers, device, progress: see :func:`folder_error`.

    Returns:
        ``{"corruption_error": mean over types x severities, "corruption_errors": {name: [error per severity]},
        "corruption_n": images per folder, "corruption_mce": mean_corruption_error (or None),
        "corruption_source": a label naming the folder, "corruption_official": True}``.
    """
    errs = {}
    counts = set()
    for c in corruptions:
        errs[c] = []
        for s in severities:
            src = _source(
                Path(root) / c / str(s), classes=classes, size=size, crop_pct=1.0, interpolation=interpolation
            )
            e, n = folder_error(
                model,
                src,
                samples=samples,
                seed=seed,
                batch_size=batch_size,
                num_workers=num_workers,
                device=device,
                progress=progress,
                desc=f"ImageNet-C {c}/{s}",
            )
            errs[c].append(e)
            counts.add(n)
    n = min(counts)
    return {
        "corruption_error": sum(sum(v) for v in errs.values()) / (len(corruptions) * len(severities)),
        "corruption_errors": errs,
        "corruption_n": n,
        "corruption_mce": mean_corruption_error(errs, severities),
        "corruption_source": f"ImageNet-C (official, from {root})",
        "corruption_official": True,
    }


def class_folder_error(
    model: nn.Module,
    root: str | Path,
    *,
    classes: Sequence[str],
    restrict: bool,
    size: int = 224,
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
    samples: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
    desc: str = "eval",
) -> tuple[float, int]:
    """Top-1 error on ``root/<wnid>/<image>`` (ImageNet-R: ``restrict=True``; Stylized-ImageNet: False).

    ``restrict``: predictions are restricted to the folder's classes (the model's outputs for the wnids present,
    ImageNet-R's 200), as the ImageNet-R authors' evaluation masks the 1000 logits. Otherwise the argmax over all
    the model's outputs. Images go through :func:`advtrain.data.val_transform` (``size``, ``crop_pct``).

    Returns:
        ``(error, samples scored)``.
    """
    src = _source(root, classes=classes, size=size, crop_pct=crop_pct, interpolation=interpolation)
    mask = sorted(src.class_to_idx.values()) if restrict else None
    return folder_error(
        model,
        src,
        mask=mask,
        samples=samples,
        seed=seed,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        progress=progress,
        desc=desc,
    )


def shift_eval(
    model: nn.Module,
    *,
    classes: Sequence[str] | None,
    corruptions: Sequence[str],
    severities: Sequence[int],
    imagenet_c: str | None = None,
    imagenet_r: str | None = None,
    stylized: str | None = None,
    fallback: Callable[[], tuple[list[Tensor], list[int]]] | None = None,
    size: int = 224,
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
    samples: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict:
    """Common corruptions (official ImageNet-C folders, else regenerated on the fly), ImageNet-R, Stylized-ImageNet.

    Args:
        model: images in [0, 1] -> logits over ``classes``.
        classes: the model's classes (wnids); needed for any folder set.
        corruptions, severities: the corruption pairs (none: no corruption evaluation).
        imagenet_c: the official ImageNet-C folder; None: ``fallback`` images corrupted by
            :func:`advtrain.eval.corruption_errors` (the imagecorruptions library), labelled as a regeneration.
        imagenet_r: ``root/<wnid>/*.jpg`` of ImageNet-R (200 classes; predictions restricted to them).
        stylized: ``root/<wnid>/*`` of Stylized-ImageNet (ImageNet val layout, 1000 classes).
        fallback: ``() -> (uint8 images, int labels)``, the validation subset to corrupt on the fly.
        size, crop_pct, interpolation: the evaluation transform of ImageNet-R and Stylized-ImageNet (ImageNet-C
            is read at ``crop_pct = 1``, see :func:`imagenet_c_errors`).
        samples: a seeded subset of each folder (every ImageNet-C pair, ImageNet-R, Stylized-ImageNet); None: all.
        seed, batch_size, num_workers, device, progress: see :func:`folder_error`.

    Returns:
        The :func:`imagenet_c_errors` keys (or :func:`advtrain.eval.corruption_errors`' plus ``corruption_mce``,
        ``corruption_source`` and ``corruption_official`` False), then ``imagenet_r_error`` / ``imagenet_r_n`` /
        ``imagenet_r_source`` and ``stylized_error`` / ``stylized_n`` / ``stylized_source`` for the sets given.

    Raises:
        ValueError: a folder set without ``classes``; corruptions without ``imagenet_c`` or ``fallback``.
    """
    from advtrain.eval._corruptions import corruption_errors

    if classes is None and (imagenet_c or imagenet_r or stylized):
        raise ValueError("the ImageNet-C/-R/Stylized folders need the model's classes (wnids)")
    loader = dict(seed=seed, batch_size=batch_size, num_workers=num_workers, device=device, progress=progress)
    out: dict = {}
    if corruptions and imagenet_c:
        out |= imagenet_c_errors(
            model,
            imagenet_c,
            classes=classes,
            corruptions=corruptions,
            severities=severities,
            size=size,
            interpolation=interpolation,
            samples=samples,
            **loader,
        )
    elif corruptions:
        if fallback is None:
            raise ValueError("corruptions without an ImageNet-C folder need fallback images to corrupt")
        images, labels = fallback()
        out |= corruption_errors(
            model, images, labels, corruptions=tuple(corruptions), severities=tuple(severities), **loader
        )
        out["corruption_mce"] = mean_corruption_error(out["corruption_errors"], severities)
        out["corruption_source"] = (
            f"ImageNet-C (on-the-fly regeneration of {len(images)} images, not the official release)"
        )
        out["corruption_official"] = False
    view = dict(classes=classes, size=size, crop_pct=crop_pct, interpolation=interpolation, samples=samples)
    if imagenet_r:
        out["imagenet_r_error"], out["imagenet_r_n"] = class_folder_error(
            model, imagenet_r, restrict=True, desc="ImageNet-R", **view, **loader
        )
        out["imagenet_r_source"] = f"ImageNet-R (from {imagenet_r}, {out['imagenet_r_n']} images)"
    if stylized:
        out["stylized_error"], out["stylized_n"] = class_folder_error(
            model, stylized, restrict=False, desc="Stylized-ImageNet", **view, **loader
        )
        out["stylized_source"] = f"Stylized-ImageNet (from {stylized}, {out['stylized_n']} images)"
    return out


def shift_table(result: dict, severities: Sequence[int]) -> str:
    """Markdown lines for a :func:`shift_eval` result: the corruption table (per type and severity) and one line
    per folder set, each naming its source."""
    lines = []
    if "corruption_errors" in result:
        src = result.get("corruption_source", "ImageNet-C")
        mce = result.get("corruption_mce")
        approx = "" if result.get("corruption_official") else ", indicative: other images than AlexNet's"
        mce_s = f"; mCE {100 * mce:.2f}% (AlexNet-normalized{approx})" if mce is not None else ""
        lines += [
            f"{src}: mean top-1 error {100 * result['corruption_error']:.2f}% on {result['corruption_n']} images "
            f"per corruption and severity{mce_s}",
            "",
            "| corruption | " + " | ".join(f"s{s}" for s in severities) + " | mean |",
            "|---|" + "---|" * (len(severities) + 1),
        ]
        for name, errs in result["corruption_errors"].items():
            cells = " | ".join(f"{100 * v:.1f}" for v in errs)
            lines.append(f"| {name} | {cells} | {100 * sum(errs) / len(errs):.1f} |")
    for key in ("imagenet_r", "stylized"):
        if f"{key}_error" in result:
            lines += ["", f"{result[f'{key}_source']}: top-1 error {100 * result[f'{key}_error']:.2f}%"]
    return "\n".join(lines)


def corruption_bars(ax, evals: list[dict]) -> None:
    """A metrics-plot panel: the last evaluation's corruption errors per type (mean over severities), its source
    in the title; an empty panel when no evaluation has them (an ``advtrain.training.Panel`` ``draw``)."""
    last = next((r for r in reversed(evals) if "corruption_errors" in r), None)
    if last is None:
        ax.axis("off")
        return
    names = list(last["corruption_errors"])
    ax.barh(names, [100 * sum(v) / len(v) for v in last["corruption_errors"].values()])
    ax.invert_yaxis()
    what = "ImageNet-C" if last.get("corruption_official") else "corruptions (regenerated)"
    ax.set(xlabel="top-1 error (%), mean over severities", title=f"{what}: mean {100 * last['corruption_error']:.1f}%")
