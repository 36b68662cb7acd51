"""Input validation shared by every attack: all checks run before any work, so nothing is half-done."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

NORMS = ("linf", "l2", "l1")


def check_norm(norm: Any) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {', '.join(map(repr, NORMS))}")


def check_bounds(bounds: Any) -> tuple[float, float]:
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise TypeError(f"bounds must be a pair of numbers (lo, hi); got {bounds!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"bounds must be finite with lo < hi; got {bounds!r}")
    return lo, hi


def check_images(x: Any, bounds: tuple[float, float], name: str = "x", *, extra: Sequence[Tensor] = ()) -> list[int]:
    """Raises unless ``x`` is a finite floating ``(B, ...)`` tensor inside ``bounds`` (one host sync).

    ``extra``: integer scalars on ``x``'s device (label extremes) fetched in the same sync; their values are
    returned, so that checking them costs no second sync. An empty ``x`` returns ``[]`` unchecked.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating tensor of pixels in [lo, hi]; got dtype {x.dtype} "
            f"(for uint8 images use x.float() / 255)"
        )
    if x.ndim < 2:
        raise ValueError(f"{name} must be batched, (B, ...) e.g. (B, C, H, W); got shape {tuple(x.shape)}")
    if x.numel() == 0:
        return []
    lo, hi = bounds
    finite = torch.isfinite(x).all()
    inside = ((x >= lo) & (x <= hi)).all()
    ok = torch.stack([finite.long(), inside.long(), *(e.long() for e in extra)]).tolist()
    if not ok[0]:
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} holds {bad} NaN or inf values")
    if not ok[1]:
        raise ValueError(
            f"{name} must lie inside bounds [{lo}, {hi}]; got min {float(x.min()):.6g}, max {float(x.max()):.6g} "
            f"(normalization belongs inside the model; pass pixels)"
        )
    return ok[2:]


def label_extremes(y: Any, x: Tensor) -> list[Tensor]:
    """``[y.min(), y.max()]`` of ``(B,)`` integer labels on ``x``'s device (unsynced), else ``[]``.

    Labels on another device (CPU labels with CUDA images) are reduced there; only device-side reductions join
    :func:`check_images`' sync.
    """
    if not (isinstance(y, Tensor) and y.ndim == 1 and y.numel() and not y.is_floating_point() and not y.is_complex()):
        return []
    yi = y.long() if y.dtype == torch.bool else y
    return [yi.min().to(x.device), yi.max().to(x.device)]


def check_label_min(name: str, y_min: int) -> None:
    """Hard labels are class indices: a negative one (cross-entropy's ignore_index -100) is refused."""
    if y_min < 0:
        raise ValueError(
            f"{name} needs hard labels in [0, num_classes); got a label {y_min}"
            + (
                " (cross-entropy's ignore_index: drop those samples, or pass a loss_fn that ignores them)"
                if y_min == -100
                else ""
            )
        )


def check_targets(y: Any, batch: int) -> None:
    if isinstance(y, Tensor):
        if y.ndim == 0 or y.shape[0] != batch:
            raise ValueError(f"y must have batch size {batch} like x; got shape {tuple(y.shape)}")


def check_steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps must be an int; got {steps!r}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0; got {steps}")
    return int(steps)


def check_positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number; got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0; got {value}")
    return float(value)


def check_step_sizes(step_size: Any, steps: int) -> list[float]:
    """Returns one step length per step from a number or a sequence of ``steps`` numbers, all ``> 0``."""
    if isinstance(step_size, (list, tuple)) or (isinstance(step_size, Tensor) and step_size.ndim == 1):
        sizes = [float(s) for s in step_size]
        if len(sizes) != steps:
            raise ValueError(f"a step_size schedule needs one value per step ({steps}); got {len(sizes)}")
        return [check_positive(s, "step_size") for s in sizes]
    return [check_positive(step_size, "step_size")] * steps


def check_fraction(value: Any, name: str) -> float:
    value = check_positive(value, name)
    if value > 1:
        raise ValueError(f"{name} must be in (0, 1]; got {value}")
    return value


def as_eps(eps: Any, batch: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Returns ``eps`` as a ``(B,)`` tensor of radii, after checking its shape and values."""
    return eps_and_max(eps, batch, device, dtype)[0]


def eps_and_max(eps: Any, batch: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, float]:
    """:func:`as_eps` and the largest radius, from the one host sync that checks an eps tensor's values."""
    if isinstance(eps, Tensor):
        if eps.is_complex() or eps.dtype == torch.bool:
            raise TypeError(f"eps must be real; got dtype {eps.dtype}")
        if eps.ndim == 0:
            e = eps.reshape(1).expand(batch)
        elif eps.ndim == 1 and eps.shape[0] == batch:
            e = eps
        else:
            raise ValueError(f"an eps tensor must be a scalar or have shape ({batch},); got {tuple(eps.shape)}")
        e = e.detach().to(device=device, dtype=dtype)
        if not e.numel():
            return e, 0.0
        ok, top = torch.stack([(torch.isfinite(e).all() & (e >= 0).all()).to(e.dtype), e.max()]).tolist()
        if not ok:
            raise ValueError(f"eps must be finite and >= 0; got min {float(e.min())}")
        return e, top
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a number or a (B,) tensor; got {eps!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0; got {eps}")
    return torch.full((batch,), float(eps), device=device, dtype=dtype), float(eps)


def warn_if_ball_holds_box(
    name: str, eps_max: float, norm: str, n: int, bounds: tuple[float, float], *, stacklevel: int
) -> None:
    """Warns when the eps-ball contains the whole box whatever ``x`` is: ``eps >= (hi - lo) * n^(1/p)``.

    That radius is the box's diameter in the norm (1 for l_inf on [0, 1], sqrt(n) for l_2, n for l_1), so the
    attack is no longer limited by eps at all; the usual cause is eps on the 0-255 scale (``eps=8`` for 8/255).
    ImageNet's l_2 eps 2 or l_1 eps 75 (n = 150528) are far below it.
    """
    lo, hi = bounds
    diameter = (hi - lo) * {"linf": 1.0, "l2": math.sqrt(n), "l1": float(n)}[norm]
    if n and eps_max > 0 and eps_max >= diameter:
        warnings.warn(
            f"{name}: eps={eps_max:g} is at least the {norm} diameter {diameter:.4g} of the pixel box "
            f"[{lo:g}, {hi:g}] ({n} values per sample): the ball holds every image, so eps constrains nothing. "
            f"eps is in pixel units: did you mean eps={eps_max:g}/255 = {eps_max / 255:.4g}?",
            UserWarning,
            stacklevel=stacklevel + 1,
        )


def check_model(model: Any) -> None:
    if not callable(model):
        raise TypeError(f"model must be callable (an nn.Module or a function); got {type(model).__name__}")


def check_autograd_available(name: str) -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError(f"{name} needs autograd for input gradients; call it outside torch.inference_mode()")


@contextmanager
def preserve_model_state(model: Callable[..., Any]):
    """Restores every buffer (BatchNorm running statistics, counters) and every module's mode on exit.

    Buffers only change during a forward in train mode, so they are copied only when some module trains.
    """
    if not isinstance(model, nn.Module):
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    saved = []
    if any(t for _, t in modes):
        saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in saved:
                b.copy_(s)
        for m, t in modes:
            m.training = t
