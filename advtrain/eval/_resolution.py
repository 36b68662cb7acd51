"""Test-time resolution: clean and robust accuracy of one model at several input sizes, as a table and a plot."""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advtrain.eval._robust import AttackFn, EvalReport, evaluate
from advtrain.tokens import _checks
from advtrain.tokens._resize import resize_reduce

Size = int | tuple[int, int]


class ResolutionResult(NamedTuple):
    """One row of a sweep: the input ``size`` as it was asked for (``s`` or ``(h, w)``) and its report."""

    size: Size
    report: EvalReport


def resolution_sweep(
    model: Any,
    loader: Iterable[Any],
    *,
    sizes: Sequence[Size],
    attacks: Mapping[str, AttackFn] | None = None,
    max_samples: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    log_every: int | None = None,
    desc: str = "eval",
) -> list[ResolutionResult]:
    r"""Clean and robust accuracy of ``model`` with the loader's images resized to each of ``sizes``.

    Each batch is resized from its own :math:`(H, W)` to :math:`(h, w)`: sides that shrink with anti-aliased
    bilinear interpolation (:func:`advtrain.tokens.resize_reduce`), sides that grow with bilinear interpolation
    (``align_corners=False``); both are convex combinations of pixels, so images in [0, 1] stay there. Then
    :func:`evaluate` runs as usual. The attacks perturb the resized images: the threat model lives at the
    evaluated resolution (an :math:`\ell_\infty` radius means the same per pixel at every size; an
    :math:`\ell_2` or :math:`\ell_1` radius spreads over :math:`hw` pixels).

    A timm ``VisionTransformer`` built with ``dynamic_img_size=True`` resamples its position embedding on the
    fly. Any fixed-size ``VisionTransformer`` inside ``model`` (``model`` itself or a submodule, e.g. under a
    normalization wrapper) is run from a deep copy of ``model`` resampled with
    :func:`advtrain.tokens.resample_vit_`, one copy per size that differs from its ``img_size``; ``model``
    is never changed. Convolutional models run at any size as they are.

    Args:
        model: maps ``(B, C, h, w)`` pixels in [0, 1] to ``(B, K)`` logits.
        loader: a re-iterable loader (a ``DataLoader``, a list; not an iterator: it is read once per size)
            of ``(x, y, ...)`` batches, ``x`` ``(B, C, H, W)`` floating pixels in [0, 1].
        sizes: input sizes, each an int ``s`` (``(s, s)``) or a pair ``(h, w)``, ``>= 1``; a ViT's must be
            multiples of its patch size. E.g. ``(224, 288, 320, 384)``.
        attacks: as in :func:`evaluate`, e.g. ``{"pgd": functools.partial(pgd, eps=4/255, step_size=1/255,
            steps=20)}``.
        max_samples: as in :func:`evaluate`: the same first samples at every size.
        device: moves each batch there before resizing (default: leave batches where they are).
        progress: show a tqdm bar per size.
        log_every: as in :func:`evaluate`.
        desc: prefix of each bar's label, followed by the size.

    Returns:
        One :class:`ResolutionResult` ``(size, report)`` per entry of ``sizes``, in order.

    Raises:
        TypeError: ``loader`` an iterator; a size that is not an int or a pair of ints.
        ValueError: empty ``sizes``; a size below 1; as :func:`evaluate` and
            :func:`advtrain.tokens.resample_vit_` (a size that is no multiple of a fixed ViT's patch size).

    Example:
        >>> import functools, torch
        >>> from advtrain import pgd
        >>> model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> data = [(torch.rand(8, 1, 8, 8), torch.randint(0, 2, (8,)))]
        >>> rows = resolution_sweep(model, data, sizes=(4, 8, 12), progress=False,
        ...                         attacks={"pgd": functools.partial(pgd, eps=0.1, step_size=0.05, steps=2)})
        >>> [(row.size, row.report.n) for row in rows]
        [(4, 8), (8, 8), (12, 8)]

    References:
        Singh, Croce & Hein, "Revisiting Adversarial Training for ImageNet: Architectures, Training and
        Generalization across Threat Models" (Sec. on test-time resolution), NeurIPS 2023, arXiv 2303.01870.
        Touvron et al., "Fixing the train-test resolution discrepancy", arXiv 1906.06423.
        Wang et al., "Revisiting Adversarial Training at Scale" (AdvXL), arXiv 2401.04727.
    """
    if isinstance(loader, Iterator):
        raise TypeError(
            f"loader must be re-iterable (a DataLoader or a list), since it is read once per size; "
            f"got the iterator {type(loader).__name__}"
        )
    if isinstance(sizes, (int, str, bytes)) or not isinstance(sizes, Sequence) or len(sizes) == 0:
        raise ValueError(f"sizes must be a non-empty sequence of ints or (h, w) pairs; got {sizes!r}")
    pairs = [_checks.check_pair(s, f"sizes[{i}]") for i, s in enumerate(sizes)]
    results = []
    for size, hw in zip(sizes, pairs):
        batches = _Resized(loader, hw, device)
        label = f"{desc} {hw[0]}px" if hw[0] == hw[1] else f"{desc} {hw[0]}x{hw[1]}px"
        report = evaluate(
            _at_size(model, hw),
            batches,
            attacks=attacks,
            max_samples=max_samples,
            progress=progress,
            log_every=log_every,
            desc=label,
        )
        results.append(ResolutionResult(size, report))
    return results


def resize_images(x: Tensor, size: Size) -> Tensor:
    r"""Resizes ``(B, C, H, W)`` images: anti-aliased bilinear where a side shrinks, bilinear where it grows.

    A shrinking side is filtered with the triangle kernel stretched by :math:`H / h`
    (:func:`advtrain.tokens.resize_reduce`); a growing one is interpolated bilinearly with
    ``align_corners=False`` (PIL's and torchvision's convention). Each output pixel is a convex combination
    of input pixels; the result is clamped to the range of ``x`` against rounding.

    Args:
        x: ``(B, C, H, W)`` floating images.
        size: the output ``(h, w)``, each ``>= 1``; an int ``s`` means ``(s, s)``.

    Returns:
        ``(B, C, h, w)`` images of ``x``'s dtype and device; ``x`` itself when the size is unchanged.

    Raises:
        TypeError: a non-tensor or non-floating ``x``; a ``size`` that is not an int or a pair of ints.
        ValueError: ``x`` not 4-D; a side below 1.

    Example:
        >>> import torch
        >>> resize_images(torch.rand(2, 3, 32, 32), (48, 16)).shape
        torch.Size([2, 3, 48, 16])
        >>> bool((resize_images(torch.full((1, 1, 4, 4), 0.5), 9) == 0.5).all())
        True

    References:
        Touvron et al., "Fixing the train-test resolution discrepancy", arXiv 1906.06423.
    """
    _checks.check_images(x)
    h, w = _checks.check_pair(size, "size")
    big_h, big_w = x.shape[2], x.shape[3]
    if (h, w) == (big_h, big_w):
        return x
    if h < big_h or w < big_w:
        x = resize_reduce(x, (min(h, big_h), min(w, big_w)))
    if (h, w) == tuple(x.shape[2:]):
        return x
    lo, hi = x.detach().amin(), x.detach().amax()
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    out = F.interpolate(work, size=(h, w), mode="bilinear", align_corners=False).to(x.dtype)
    return out.clamp(min=lo, max=hi)


def format_resolution_table(results: Sequence[ResolutionResult]) -> str:
    """A markdown table of a sweep: one row per size, clean and robust accuracy in percent, samples, seconds.

    Robust columns are the union of the reports' attack names, in order of first appearance; a report
    without one shows ``-``.

    Args:
        results: ``(size, EvalReport)`` pairs, as :func:`resolution_sweep` returns.

    Returns:
        The table, one line per row, no trailing newline.

    Raises:
        TypeError: an entry that is not a ``(size, EvalReport)`` pair.
        ValueError: no results.

    Example:
        >>> from advtrain.eval import EvalReport
        >>> print(format_resolution_table([(224, EvalReport(100, 0.7, {"pgd": 0.4}, 2.0)),
        ...                                ((256, 320), EvalReport(100, 0.75, {"pgd": 0.45}, 3.0))]))
        | resolution | clean (%) | pgd (%) | n | time (s) |
        |---|---|---|---|---|
        | 224 | 70.00 | 40.00 | 100 | 2.0 |
        | 256x320 | 75.00 | 45.00 | 100 | 3.0 |

    References:
        Singh, Croce & Hein, "Revisiting Adversarial Training for ImageNet", NeurIPS 2023, arXiv 2303.01870.
    """
    rows = _check_results(results)
    names = _metric_names(rows)
    lines = [
        "| resolution | " + " | ".join(f"{k} (%)" for k in names) + " | n | time (s) |",
        "|---|" + "---|" * (len(names) + 2),
    ]
    for size, r in rows:
        accs = [_accuracy(r, k) for k in names]
        cells = ["-" if a is None else f"{100 * a:.2f}" for a in accs]
        lines.append(f"| {_size_label(size)} | " + " | ".join(cells) + f" | {r.n} | {r.seconds:.1f} |")
    return "\n".join(lines)


def plot_resolution(results: Sequence[ResolutionResult], path: str | Path, *, title: str | None = None) -> Path:
    r"""Writes a PNG of accuracy (%) against input resolution: one line per metric (clean, then each attack).

    The x position of an ``(h, w)`` size is :math:`\sqrt{hw}` (its side for square sizes), labelled with the
    size itself. Drawn with matplotlib's Agg canvas on its own ``Figure``: no pyplot state, no display needed.

    Args:
        results: ``(size, EvalReport)`` pairs, as :func:`resolution_sweep` returns.
        path: the PNG file to write; its folder must exist.
        title: the plot's title (default: none).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        TypeError: an entry that is not a ``(size, EvalReport)`` pair.
        ValueError: no results.

    Example:
        >>> import os, tempfile
        >>> from advtrain.eval import EvalReport
        >>> rows = [(s, EvalReport(10, 0.5 + s / 1000, {"pgd": 0.3}, 1.0)) for s in (224, 288)]
        >>> with tempfile.TemporaryDirectory() as d:
        ...     os.path.getsize(plot_resolution(rows, os.path.join(d, "res.png"))) > 0
        True

    References:
        Singh, Croce & Hein, "Revisiting Adversarial Training for ImageNet", NeurIPS 2023, arXiv 2303.01870.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = _check_results(results)
    xs = [math.sqrt(h * w) for h, w in (_pair(size) for size, _ in rows)]
    fig = Figure(figsize=(5, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name in _metric_names(rows):
        points = [(x, 100 * a) for x, (_, r) in zip(xs, rows) if (a := _accuracy(r, name)) is not None]
        ax.plot(*zip(*points), marker="o", label=name)
    ax.set_xticks(xs, [_size_label(size) for size, _ in rows])
    ax.set_xlabel("input resolution (px)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png", dpi=120)
    return path


class _Resized:
    """Re-iterable view of ``loader`` with each batch's images moved to ``device`` and resized to ``size``."""

    def __init__(self, loader: Iterable[Any], size: tuple[int, int], device: torch.device | str | None):
        self.loader, self.size, self.device = loader, size, device

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        for batch in self.loader:
            x, *rest = batch
            if self.device is not None:
                x = x.to(self.device, non_blocking=True)
                rest = [t.to(self.device, non_blocking=True) if isinstance(t, Tensor) else t for t in rest]
            yield (resize_images(x, self.size), *rest)


def _at_size(model: Any, size: tuple[int, int]) -> Any:
    """``model``, or a deep copy with every fixed-size timm ViT inside it resampled to ``size``."""
    if not isinstance(model, nn.Module):
        return model
    from timm.models.vision_transformer import VisionTransformer

    from advtrain.tokens import resample_vit_

    def needs(m: nn.Module) -> bool:
        return isinstance(m, VisionTransformer) and not m.dynamic_img_size and tuple(m.patch_embed.img_size) != size

    if not any(needs(m) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for m in [m for m in model.modules() if needs(m)]:
        resample_vit_(m, img_size=size)
    return model


def _pair(size: Size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, numbers.Integral) else (int(size[0]), int(size[1]))


def _size_label(size: Size) -> str:
    h, w = _pair(size)
    return f"{h}" if isinstance(size, numbers.Integral) else f"{h}x{w}"


def _check_results(results: Any) -> list[tuple[Size, EvalReport]]:
    rows = list(results)
    if not rows:
        raise ValueError("results is empty: nothing to tabulate or plot")
    for i, row in enumerate(rows):
        if not (isinstance(row, tuple) and len(row) == 2 and isinstance(row[1], EvalReport)):
            raise TypeError(f"results[{i}] must be a (size, EvalReport) pair; got {row!r}")
        _checks.check_pair(row[0], f"results[{i}].size")
    return [(size, r) for size, r in rows]


def _metric_names(rows: list[tuple[Size, EvalReport]]) -> list[str]:
    names = ["clean"]
    for _, r in rows:
        names += [k for k in r.robust if k not in names]
    return names


def _accuracy(r: EvalReport, name: str) -> float | None:
    return r.clean if name == "clean" else r.robust.get(name)
