"""The metrics plot: one panel per quantity against samples seen, stage boundaries drawn and named."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

Keys = tuple[str, ...] | Callable[[str], bool]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Panel:
    """One panel of :func:`plot_metrics`.

    Args:
        title: the panel's title.
        ylabel: the y axis label.
        kind: which rows it draws: ``"train"`` lines or ``"eval"`` points (each annotated with its value).
        keys: the row keys to draw (a tuple, or a predicate on key names); each key is a line with a legend.
        scale: multiplies the values (100 for fractions shown in %).
        labels: legend label per key (default: the key).
        draw: a custom panel instead: ``draw(ax, rows)`` (e.g. a bar chart of the last evaluation).
    """

    title: str
    ylabel: str = ""
    kind: Literal["train", "eval"] = "train"
    keys: Keys = ()
    scale: float = 1.0
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    draw: Callable[[Any, list[dict]], None] | None = None


def _keys(panel: Panel, rows: list[dict]) -> list[str]:
    if callable(panel.keys):
        return sorted({k for r in rows for k in r if panel.keys(k)})
    return [k for k in panel.keys if any(k in r for r in rows)]


def plot_metrics(
    rows: list[dict],
    path: str | Path,
    *,
    panels: list[Panel],
    total: int | None = None,
    edges: list[tuple[float, str]] = (),
    width: float = 5.5,
) -> Path | None:
    """Draws metric rows (``read_metrics``) into a PNG, one panel per :class:`Panel`, left to right.

    Training rows are lines (with markers when there are few points, so a short run still shows its curve);
    evaluation rows are points annotated with their values. Every curve panel spans ``[0, total]`` samples and
    shows the ``edges`` (stage boundaries) as dashed lines labelled with their names.

    Args:
        rows: metric rows with ``kind`` and ``samples``.
        path: the PNG to write.
        panels: what to draw.
        total: the run's total samples (the x range); None: the last row's.
        edges: ``(samples, label)`` per boundary, e.g. ``(128, "coarse | fine")``.
        width: inches per panel.

    Returns:
        ``path``, or None when there are no training rows yet.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(r.get("kind") == "train" for r in rows):
        return None
    total = total or max(r.get("samples", 0) for r in rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        mine = [r for r in rows if r.get("kind") == panel.kind]
        if panel.draw is not None:
            panel.draw(ax, mine)
            continue
        for key in _keys(panel, mine):
            pts = [(r["samples"], panel.scale * r[key]) for r in mine if isinstance(r.get(key), (int, float))]
            if not pts:
                continue
            xs, ys = zip(*pts)
            if panel.kind == "eval":
                ax.plot(xs, ys, marker="o", ls=":", label=panel.labels.get(key, key))
                for x, y in pts:
                    ax.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            else:
                ax.plot(xs, ys, lw=1, marker="o" if len(pts) <= 30 else None, ms=3, label=panel.labels.get(key, key))
        ax.set(xlabel="samples seen", ylabel=panel.ylabel, title=panel.title, xlim=(0, total * 1.02))
        if edges:  # headroom for the boundary labels, above the curves
            lo, hi = ax.get_ylim()
            ax.set_ylim(lo, hi + 0.15 * (hi - lo))
        for x, label in edges:
            ax.axvline(x, ls="--", c="gray", lw=0.8)
            ax.annotate(
                label,
                (x, 1),
                xycoords=("data", "axes fraction"),
                xytext=(0, -12),
                textcoords="offset points",
                ha="center",
                fontsize=8,
                color="gray",
                bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none"),
            )
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
