"""Projected gradient descent (PGD) and the fast gradient sign method (FGSM) under l_inf, l_2 and l_1."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from advtrain.attacks import _checks, _guard
from advtrain.attacks._projections import Norm, norm_of, project_delta

LossFn = Callable[[Tensor, Any], Tensor]


def pgd(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Any,
    *,
    eps: float | Tensor,
    step_size: float | Sequence[float],
    steps: int,
    norm: Norm = "linf",
    loss_fn: LossFn | None = None,
    targeted: bool = False,
    random_start: bool = True,
    bounds: tuple[float, float] = (0.0, 1.0),
    return_best: bool = False,
    l1_sparsity: float = 0.01,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Projected gradient ascent on a loss inside an eps-ball intersected with the pixel box.

    .. math::
        \delta_{t+1} = \Pi_{\{\|\delta\| \le \epsilon\} \cap \{lo \le x + \delta \le hi\}}
        \big(\delta_t + \alpha\, s(\nabla_\delta \ell(f(x + \delta_t), y))\big),

    with the steepest-ascent direction :math:`s` of each norm: :math:`\mathrm{sign}(g)` for l_inf,
    :math:`g / \|g\|_2` for l_2, and for l_1 a sparse step on the ``l1_sparsity`` fraction of coordinates with the
    largest :math:`|g_i|` that the box lets move, scaled to l_1 length :math:`\alpha` (SLIDE), or to the l_1
    budget left while the ball is not yet full (an overshoot would be soft-thresholded off every coordinate).
    :math:`\Pi` is the
    exact Euclidean projection onto the intersection (a clamp for l_inf, sort-based solvers for l_2 and l_1). The
    random start is uniform in the ball (not on its surface), then projected. A targeted attack descends the loss.

    The model runs in whatever mode it is in. To attack with batch statistics (train-mode BatchNorm), as Fast
    AdvProp does through its auxiliary BN, put the model (or that route) in train mode before the call: the
    running statistics it updates are restored afterwards. Input gradients come from ``torch.autograd.grad``, so
    parameters' ``.grad`` are never written, and the call works under ``torch.no_grad()``. Under bf16/fp16
    autocast the perturbation, the step and the projection stay in float32.

    Non-finite values: a sample whose loss or input gradient at its iterate holds a NaN or an inf (a diverged
    model, a row that overflows in fp16/bf16) does not step there: it keeps that iterate, which is inside the ball
    and the box, and with ``return_best`` a non-finite loss is never the best. The guard is a per-sample
    ``torch.where`` on device; one :class:`~advtrain.attacks.NonFiniteWarning` at the end of the call (its one
    host sync beyond the input check) says how many samples it held back. The other samples are untouched by it
    (unless the model mixes samples, as train-mode BatchNorm does). To stop instead, make that warning an error:
    ``warnings.simplefilter("error", NonFiniteWarning)``.

    Args:
        model: maps ``(B, C, H, W)`` pixels in ``bounds`` to outputs (logits, or features for a custom loss);
            normalization belongs inside it. A ``torch.compile``-d module works.
        x: ``(B, ...)`` floating images inside ``bounds`` (float32, float64, bfloat16 or float16).
        y: targets handed to ``loss_fn``: ``(B,)`` labels or ``(B, K)`` soft targets for the default loss.
        eps: radius in the norm's units (pixels for l_inf), ``>= 0``; a float or a ``(B,)`` tensor.
        step_size: step length :math:`\alpha` in the norm's units, ``> 0``; or a sequence of ``steps`` lengths,
            one per step (a decaying schedule lets the l_1 attack settle on a face of the box).
        steps: number of gradient steps, ``>= 0`` (0 returns the start point).
        norm: ``"linf"``, ``"l2"`` or ``"l1"``.
        loss_fn: ``loss_fn(output, y)`` returning ``(B,)`` per-sample losses (a scalar is accepted unless
            ``return_best``). Default: cross-entropy with hard or soft targets.
        targeted: minimize the loss towards ``y`` instead of maximizing it.
        random_start: start from a uniform sample of the ball instead of ``x``.
        bounds: the valid pixel box ``(lo, hi)``.
        return_best: return, per sample, the iterate with the highest loss (lowest if targeted), the start
            included; costs one extra forward.
        l1_sparsity: fraction of coordinates moved by an l_1 step, in ``(0, 1]`` (at least one coordinate).
        generator: source of all randomness (random start).

    Returns:
        ``x + delta``: a detached tensor of ``x``'s shape, dtype and device, inside the ball and the box. The
        final rounding to ``x``'s dtype is directed towards ``x``, so no coordinate moves further than the
        projected perturbation allows, even in bfloat16.

    Raises:
        TypeError: non-tensor or integer ``x``, non-int ``steps``, non-numeric hyperparameters; with the default
            loss, a model output that is not a tensor (a tuple or dict: the message names it); a ``loss_fn``
            result that is not a tensor.
        ValueError: NaN/inf or out-of-bounds ``x``; ``eps < 0``; ``step_size <= 0``; ``steps < 0``; an unknown
            norm; ``y`` whose batch size differs from ``x``'s; an eps tensor of the wrong shape; with the default
            loss, hard labels outside ``[0, K)``: a negative one (cross-entropy's ignore_index -100) before the
            model runs, one ``>= K`` once the first output shows ``K``. Soft targets and custom losses are not
            checked.
        RuntimeError: inside ``torch.inference_mode()``, where no gradient can be taken.

    Warns:
        UserWarning: an eps whose ball holds the whole box, ``eps >= (hi - lo) * n^(1/p)`` for ``n`` pixel values
            (l_inf: ``eps >= 1`` on [0, 1], e.g. ``eps=8`` for 8/255); the message suggests the ``/ 255``.
        NonFiniteWarning: some samples met a NaN/inf loss or input gradient (see above).

    Side effects:
        None: the model's mode, parameters, buffers and ``.grad`` are left as found.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
        >>> g = torch.Generator().manual_seed(0)
        >>> x_adv = pgd(model, x, y, eps=4 / 255, step_size=1 / 255, steps=3, generator=g)
        >>> bool(((x_adv - x).abs() <= 4 / 255 + 1e-7).all()), x_adv.shape == x.shape
        (True, True)

    References:
        Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", arXiv 1706.06083.
        Tramer & Boneh, "Adversarial Training and Robustness for Multiple Perturbations", arXiv 1904.13000 (SLIDE).
        Croce & Hein, "Mind the box: l1-APGD for sparse adversarial attacks", arXiv 2103.01208.
    """
    return _pgd(
        "pgd",
        model,
        x,
        y,
        eps=eps,
        step_size=step_size,
        steps=steps,
        norm=norm,
        loss_fn=loss_fn,
        targeted=targeted,
        random_start=random_start,
        bounds=bounds,
        return_best=return_best,
        l1_sparsity=l1_sparsity,
        generator=generator,
        stacklevel=3,
    )


def _pgd(
    name,
    model,
    x,
    y,
    *,
    eps,
    step_size,
    steps,
    norm,
    loss_fn,
    targeted,
    random_start,
    bounds,
    return_best,
    l1_sparsity,
    generator,
    stacklevel,
):
    """pgd and fgsm; ``stacklevel`` points warnings at the user's call (as ``warnings.warn`` counts it here)."""
    a = prepare_attack(
        name,
        model,
        x,
        y,
        eps=eps,
        steps=steps,
        norm=norm,
        loss_fn=loss_fn,
        bounds=bounds,
        l1_sparsity=l1_sparsity,
        stacklevel=stacklevel,
    )
    step_sizes = _checks.check_step_sizes(step_size, a.steps)
    lo, hi, eps64, eps_t, work, loss_fn, l1_sparsity = a.lo, a.hi, a.eps64, a.eps, a.work, a.loss_fn, a.l1_sparsity
    if x.numel() == 0:
        return x.detach().clone()

    skipped = _guard.Skipped(x.shape[0], x.device)
    with _checks.preserve_model_state(model), torch.enable_grad():
        delta = _attack(
            model,
            x,
            y,
            eps_t,
            step_sizes=step_sizes,
            norm=norm,
            loss_fn=loss_fn,
            targeted=targeted,
            random_start=random_start,
            bounds=(lo, hi),
            return_best=return_best,
            l1_sparsity=l1_sparsity,
            generator=generator,
            work=work,
            skipped=skipped,
        )
    skipped.warn(name, stacklevel=stacklevel)
    return _finalize(x, delta, eps64, norm, (lo, hi))


class Prepared(NamedTuple):
    """An attack's checked inputs: box, step count, radii (as given and in the working dtype), loss."""

    lo: float
    hi: float
    steps: int
    eps64: Tensor  # (B,) float64, exactly as given: the final feasibility is checked against it
    eps: Tensor  # (B,) in the working dtype
    work: torch.dtype
    loss_fn: LossFn
    l1_sparsity: float


def prepare_attack(
    name: str, model, x, y, *, eps, steps, norm, loss_fn, bounds, l1_sparsity, stacklevel: int
) -> Prepared:
    """The checks every attack shares, all before any work (nothing is half-done when one fails).

    One host sync checks ``x`` and reads the extremes of hard labels; an eps tensor costs one more (as before).
    Labels ``>= K`` can only be refused once the first output shows ``K``: the default loss does that, on the host.
    """
    _checks.check_model(model)
    lo, hi = _checks.check_bounds(bounds)
    hard = loss_fn is None and isinstance(y, Tensor)
    extremes = _checks.check_images(x, (lo, hi), extra=_checks.label_extremes(y, x) if hard else ())
    _checks.check_norm(norm)
    steps = _checks.check_steps(steps)
    l1_sparsity = _checks.check_fraction(l1_sparsity, "l1_sparsity")
    _checks.check_targets(y, x.shape[0])
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    eps64, eps_max = _checks.eps_and_max(eps, x.shape[0], x.device, torch.float64)
    if loss_fn is None:
        if not isinstance(y, Tensor):
            raise TypeError(f"the default loss needs y as a tensor of labels or soft targets; got {type(y).__name__}")
        if extremes:
            _checks.check_label_min(name, extremes[0])
        loss_fn = _guard.default_loss(name, extremes[1] if extremes else None)
    _checks.check_autograd_available(name)
    _checks.warn_if_ball_holds_box(name, eps_max, norm, math.prod(x.shape[1:]), (lo, hi), stacklevel=stacklevel + 1)
    return Prepared(lo, hi, steps, eps64, eps64.to(work), work, loss_fn, l1_sparsity)


def fgsm(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Any,
    *,
    eps: float | Tensor,
    step_size: float | None = None,
    norm: Norm = "linf",
    loss_fn: LossFn | None = None,
    targeted: bool = False,
    random_start: bool = False,
    bounds: tuple[float, float] = (0.0, 1.0),
    l1_sparsity: float = 0.01,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""One steepest-ascent step, projected: FGSM, or RS-FGSM with ``random_start=True``.

    .. math::
        x_{adv} = \Pi(x + \delta_0 + \alpha\, s(\nabla_x \ell(f(x + \delta_0), y))),

    with :math:`\delta_0 = 0` (FGSM, :math:`\alpha = \epsilon`) or uniform in the ball (RS-FGSM of Wong et al.,
    who use :math:`\alpha = 1.25\epsilon`). Same contract, options, errors and warnings as :func:`pgd` with
    ``steps=1``: a sample whose loss or gradient is NaN/inf returns its start point (``x``, or its random start).

    Args:
        model: see :func:`pgd`.
        x: ``(B, ...)`` floating images inside ``bounds``.
        y: targets for ``loss_fn``.
        eps: radius, ``>= 0``; a float or a ``(B,)`` tensor.
        step_size: step length in the norm's units; defaults to ``eps`` (a float ``eps`` is required then).
        norm: ``"linf"``, ``"l2"`` or ``"l1"``.
        loss_fn: see :func:`pgd`.
        targeted: descend the loss towards ``y``.
        random_start: start uniformly inside the ball (RS-FGSM).
        bounds: the valid pixel box ``(lo, hi)``.
        l1_sparsity: see :func:`pgd`.
        generator: source of all randomness.

    Returns:
        A detached tensor of ``x``'s shape, dtype and device, inside the ball and the box.

    Side effects:
        None (see :func:`pgd`).

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> x, y = torch.full((2, 3, 2, 2), 0.5), torch.tensor([0, 1])
        >>> x_adv = fgsm(model, x, y, eps=8 / 255)
        >>> torch.allclose((x_adv - x).abs(), torch.full_like(x, 8 / 255))
        True

    References:
        Goodfellow et al., "Explaining and Harnessing Adversarial Examples", arXiv 1412.6572.
        Wong et al., "Fast is better than free: Revisiting adversarial training", arXiv 2001.03994.
    """
    if step_size is None:
        if isinstance(eps, Tensor):
            raise TypeError("fgsm needs an explicit step_size when eps is a tensor")
        step_size = eps if eps > 0 else 1.0
    return _pgd(
        "fgsm",
        model,
        x,
        y,
        eps=eps,
        step_size=step_size,
        steps=1,
        norm=norm,
        loss_fn=loss_fn,
        targeted=targeted,
        random_start=random_start,
        bounds=bounds,
        return_best=False,
        l1_sparsity=l1_sparsity,
        generator=generator,
        stacklevel=3,
    )


# ----------------------------------------------------------------------------------------------------------------
# The loop, on flattened (B, n) perturbations in float32 (float64 for float64 inputs).


def _attack(
    model,
    x,
    y,
    eps,
    *,
    step_sizes,
    norm,
    loss_fn,
    targeted,
    random_start,
    bounds,
    return_best,
    l1_sparsity,
    generator,
    work,
    skipped,
):
    lo, hi = bounds
    xw = x.detach().flatten(1).to(work)
    lo_d, hi_d = lo - xw, hi - xw  # the box, in perturbation space
    n = xw.shape[1]
    k = max(1, math.ceil(l1_sparsity * n))
    if random_start:
        delta = random_in_ball(xw.shape, eps, norm, generator=generator, device=x.device, dtype=work)
        delta = project_delta(delta, lo_d, hi_d, eps, norm)
    else:
        delta = torch.zeros_like(xw)
    sign = -1.0 if targeted else 1.0
    best, best_score = delta, None

    def forward(d: Tensor) -> Tensor:
        return model((xw + d).view(x.shape).to(x.dtype))

    def per_sample(loss: Tensor) -> Tensor:
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss_fn must return a tensor of losses; got {type(loss).__name__}")
        if return_best and not (loss.ndim == 1 and loss.shape[0] == x.shape[0]):
            raise ValueError(f"return_best needs loss_fn to return (B,) losses; got shape {tuple(loss.shape)}")
        return loss if loss.dtype in (torch.float32, torch.float64) else loss.float()  # float64 keeps its bits

    for step_size in step_sizes:
        d = delta.detach().requires_grad_(True)
        loss = per_sample(loss_fn(forward(d), y))
        (grad,) = torch.autograd.grad(loss.sum(), d)
        loss, grad = loss.detach(), grad.to(work)
        bad = _guard.bad_rows(loss, grad)  # these samples stay where they are: a NaN step would leave the ball
        skipped.add(bad)
        if return_best:
            best, best_score = _keep_best(best, best_score, delta, _guard.finite_score(sign * loss, bad))
        step = _direction(sign * grad, norm, delta, lo_d, hi_d, k)
        if norm == "l1":
            step = step * _l1_step_length(delta, eps, step_size)
        else:
            step = step * step_size
        delta = torch.where(bad.unsqueeze(1), delta, project_delta(delta + step, lo_d, hi_d, eps, norm))
    if return_best:
        with torch.no_grad():
            loss = per_sample(loss_fn(forward(delta), y))
        bad = _guard.bad_rows(loss, None)
        skipped.add(bad)
        best, _ = _keep_best(best, best_score, delta, _guard.finite_score(sign * loss, bad))
        delta = best
    return delta.detach()


def _keep_best(best: Tensor, best_score: Tensor | None, delta: Tensor, score: Tensor):
    if best_score is None:
        return delta.detach(), score
    better = score > best_score
    return torch.where(better.unsqueeze(1), delta.detach(), best), torch.where(better, score, best_score)


def _l1_step_length(delta: Tensor, eps: Tensor, step_size: float) -> Tensor:
    """``(B, 1)`` l_1 step lengths: ``step_size``, but no further than the sphere while the ball is not full.

    The projection answers an overshoot with a soft threshold that takes mass from every coordinate alike, the
    most valuable ones included; stopping on the sphere instead keeps a greedy fill exact.
    """
    budget = eps - delta.abs().sum(1)
    room = budget > 1e-6 * eps
    return torch.where(room, budget.clamp(max=step_size), step_size).unsqueeze(1)


def _direction(g: Tensor, norm: Norm, delta: Tensor, lo_d: Tensor, hi_d: Tensor, k: int) -> Tensor:
    """Unit steepest-ascent direction of each norm for the gradient ``g`` (flattened)."""
    match norm:
        case "linf":
            return g.sign()
        case "l2":
            g = g / g.abs().amax(1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)  # no under/overflow
            return g / g.norm(dim=1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)
        case "l1":
            # coordinates pinned against the box in the ascent direction cannot move: never pick them
            blocked = ((delta <= lo_d) & (g < 0)) | ((delta >= hi_d) & (g > 0))
            score = g.abs().masked_fill(blocked, 0)
            top = score.topk(min(k, score.shape[1]), dim=1)
            e = torch.zeros_like(g).scatter(1, top.indices, g.gather(1, top.indices).sign() * (top.values > 0))
            return e / e.abs().sum(1, keepdim=True).clamp_min(1)
    raise ValueError(f"unknown norm {norm!r}")


def random_in_ball(
    shape: tuple[int, int], eps: Tensor, norm: Norm, *, generator: torch.Generator | None, device, dtype
) -> Tensor:
    r"""Samples ``(B, n)`` perturbations uniformly from the ball of radius ``eps[b]`` (not from its surface).

    l_inf: uniform coordinates. l_2: a Gaussian direction times radius :math:`\epsilon U^{1/n}`. l_1: random signs
    times :math:`\epsilon (E_1, \dots, E_n) / \sum_{i=1}^{n+1} E_i` with i.i.d. exponentials, which is uniform on
    the l_1 ball (Barthe et al., 2005).
    """
    b, n = shape
    gdev = generator.device if generator is not None else device
    e = eps.to(gdev).unsqueeze(1)
    match norm:
        case "linf":
            d = (torch.rand(shape, generator=generator, device=gdev, dtype=dtype) * 2 - 1) * e
        case "l2":
            z = torch.randn(shape, generator=generator, device=gdev, dtype=dtype)
            z = z / z.norm(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
            u = torch.rand((b, 1), generator=generator, device=gdev, dtype=dtype)
            d = z * torch.exp(torch.log(u) / n) * e
        case "l1":
            ex = torch.empty((b, n + 1), device=gdev, dtype=dtype).exponential_(generator=generator)
            signs = torch.randint(0, 2, shape, generator=generator, device=gdev).to(dtype) * 2 - 1
            d = signs * ex[:, :n] / ex.sum(1, keepdim=True) * e
        case _:
            raise ValueError(f"unknown norm {norm!r}")
    return d.to(device)


def _finalize(x: Tensor, delta: Tensor, eps: Tensor, norm: Norm, bounds: tuple[float, float]) -> Tensor:
    """Builds ``x + delta`` in ``x``'s dtype so that it lies strictly inside the ball and the box.

    Works in float64: clamps to the box, shrinks by the projection's rounding error where the norm exceeds eps,
    then rounds each coordinate to ``x``'s dtype towards ``x`` (never further from it than ``delta`` allows).
    """
    lo, hi = bounds
    x_flat = x.detach().flatten(1)
    x64 = x_flat.double()
    d = torch.clamp(delta.double(), lo - x64, hi - x64)
    e = eps.double()
    if norm == "linf":
        d = torch.minimum(torch.maximum(d, -e.unsqueeze(1)), e.unsqueeze(1))
    else:
        size = norm_of(d, norm)
        over = size > e
        scale = torch.where(over, e / size.clamp_min(torch.finfo(torch.float64).tiny), 1.0)
        d = d * (scale * (1 - 4 * torch.finfo(torch.float64).eps * over)).unsqueeze(1)
    out = (x64 + d).to(x.dtype)
    overshoot = (out.double() - x64).abs() > d.abs()
    out = torch.where(overshoot, torch.nextafter(out, x_flat), out)
    return out.clamp(lo, hi).view(x.shape)
