"""Auto-PGD (APGD): PGD with momentum and a step size that halves at checkpoints; l1-APGD's sparse steps for l_1."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from advtrain.attacks import _checks, _guard
from advtrain.attacks._pgd import LossFn, _direction, _finalize, prepare_attack, random_in_ball
from advtrain.attacks._projections import Norm, project_delta


def apgd(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Any,
    *,
    eps: float | Tensor,
    steps: int,
    norm: Norm = "linf",
    loss_fn: LossFn | None = None,
    targeted: bool = False,
    rho: float = 0.75,
    momentum: float = 0.75,
    random_start: bool = True,
    bounds: tuple[float, float] = (0.0, 1.0),
    l1_sparsity: float = 0.2,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Auto-PGD: step-size-free projected gradient ascent with momentum; returns each sample's best iterate.

    With :math:`\Pi` the exact projection onto the eps-ball intersected with the pixel box and :math:`s` the
    steepest-ascent direction of the norm (as in :func:`pgd`), each step is

    .. math::
        z_{k+1} = \Pi\big(\delta_k + \eta_k\, s(\nabla \ell(\delta_k))\big),\qquad
        \delta_{k+1} = \Pi\big(\delta_k + \alpha (z_{k+1} - \delta_k) + (1 - \alpha)(\delta_k - \delta_{k-1})\big),

    with :math:`\alpha = 1` on the first step and ``momentum`` after. l_inf and l_2 start at
    :math:`\eta_0 = 2\epsilon` and check at the iterates :math:`w_j = \lceil p_j N \rceil` (:math:`N` = ``steps``),
    :math:`p_0 = 0,\ p_1 = 0.22,\ p_{j+1} = p_j + \max(p_j - p_{j-1} - 0.03,\ 0.06)`: a sample halves its step
    size and restarts from its best point (its gradient included) when, since the last checkpoint, fewer than
    ``rho`` :math:`\cdot (w_j - w_{j-1})` steps raised the loss, or when its step size was not halved at the last
    checkpoint and its best loss has not risen since.

    l_1 (l1-APGD, "Mind the box"): the step moves the ``k`` coordinates with the largest :math:`|g_i|` that the
    box lets move, each by :math:`\eta / k` in the sign of :math:`g_i`, then projects exactly onto the l_1 ball
    intersected with the box; no momentum (as in the reference code). :math:`\eta_0 = \epsilon` and the fraction
    ``k / n`` starts at ``l1_sparsity``. Every :math:`\max(\lfloor 0.04 N \rfloor, 1)` steps, ``k`` becomes the
    number of nonzero coordinates of the best point divided by 1.5, rounded down but at least 1 (the reference
    rounds up, so never goes below two coordinates); where that number fell below 95% of its value at the
    previous check, :math:`\eta` resets to :math:`\epsilon` and the sample restarts from its best point,
    elsewhere :math:`\eta` shrinks by 1.5, never below :math:`\epsilon / 10`.

    The returned point is, per sample, the iterate with the highest loss (lowest if ``targeted``) among
    :math:`\delta_0, \dots, \delta_N`, the start included: ``steps`` forward-backward passes and one forward.
    With ``steps=2`` (the training attack of Singh et al.) the only check is after the first step: a step that
    did not raise the loss is retried from the start with half the step size.

    Non-finite values: a sample whose loss or input gradient at an iterate holds a NaN or an inf does not step from
    it. A new iterate with a non-finite loss or gradient is undone (the sample stays at its last finite iterate,
    with that iterate's gradient and momentum, and the step counts as not raising the loss, so a checkpoint
    halves it); a start with one gets score ``-inf`` and a zero gradient. A non-finite loss is never the best, so
    the result is an iterate with a finite loss, or the start. One
    :class:`~advtrain.attacks.NonFiniteWarning` per call says how many samples were affected, as in :func:`pgd`.

    Args:
        model: maps ``(B, C, H, W)`` pixels in ``bounds`` to outputs; see :func:`pgd`.
        x: ``(B, ...)`` floating images inside ``bounds`` (float32, float64, bfloat16 or float16).
        y: targets handed to ``loss_fn``: ``(B,)`` labels or ``(B, K)`` soft targets for the default loss.
        eps: radius in the norm's units (pixels for l_inf), ``>= 0``; a float or a ``(B,)`` tensor.
        steps: number of gradient steps :math:`N`, ``>= 0`` (0 returns the start point); e.g. 2 for training,
            100 for evaluation.
        norm: ``"linf"``, ``"l2"`` or ``"l1"``.
        loss_fn: ``loss_fn(output, y)`` returning ``(B,)`` per-sample losses (the step-size rule is per sample).
            Default: cross-entropy with hard or soft targets (APGD-CE).
        targeted: minimize the loss towards ``y`` instead of maximizing it.
        rho: the fraction of loss-raising steps below which l_inf and l_2 halve the step size, in ``(0, 1]``.
        momentum: the paper's :math:`\alpha`, the weight of the new projected step (``1 - momentum`` weighs the
            previous move), in ``(0, 1]``; 1 disables momentum. Not used by l_1.
        random_start: start from a uniform sample of the ball (projected onto the box) instead of ``x``.
        bounds: the valid pixel box ``(lo, hi)``.
        l1_sparsity: l_1 only: the fraction of coordinates the first steps move, in ``(0, 1]`` (at least one).
        generator: source of all randomness (random start).

    Returns:
        ``x + delta``: a detached tensor of ``x``'s shape, dtype and device, inside the ball and the box, rounded
        towards ``x`` as in :func:`pgd`.

    Raises:
        TypeError: non-tensor or integer ``x``, non-int ``steps``, non-numeric hyperparameters; with the default
            loss, a model output that is not a tensor (a tuple or dict: the message names it); a ``loss_fn``
            result that is not a tensor.
        ValueError: NaN/inf or out-of-bounds ``x``; ``eps < 0``; ``steps < 0``; ``rho``, ``momentum`` or
            ``l1_sparsity`` outside ``(0, 1]``; an unknown norm; ``y`` whose batch size differs from ``x``'s; an eps
            tensor of the wrong shape; a ``loss_fn`` that does not return ``(B,)`` losses (raised after a forward);
            with the default loss, hard labels outside ``[0, K)`` (as :func:`pgd`).
        RuntimeError: inside ``torch.inference_mode()``, where no gradient can be taken.

    Warns:
        UserWarning: an eps whose ball holds the whole box (as :func:`pgd`: ``eps=8`` for 8/255).
        NonFiniteWarning: some samples met a NaN/inf loss or input gradient.

    Side effects:
        None: the model's mode, parameters, buffers and ``.grad`` are left as found.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
        >>> x_adv = apgd(model, x, y, eps=4 / 255, steps=5, generator=torch.Generator().manual_seed(0))
        >>> bool(((x_adv - x).abs() <= 4 / 255 + 1e-7).all()), x_adv.shape == x.shape
        (True, True)

    References:
        Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
        attacks", ICML 2020, arXiv 2003.01690.
        Croce & Hein, "Mind the box: l1-APGD for sparse adversarial attacks on image classifiers", ICML 2021,
        arXiv 2103.01208.
        Singh, Croce & Hein, "Revisiting Adversarial Training for ImageNet: Architectures, Training and
        Generalization across Threat Models", NeurIPS 2023, arXiv 2303.01870 (2-step APGD for training).
    """
    a = prepare_attack(
        "apgd",
        model,
        x,
        y,
        eps=eps,
        steps=steps,
        norm=norm,
        loss_fn=loss_fn,
        bounds=bounds,
        l1_sparsity=l1_sparsity,
        stacklevel=2,
    )
    rho = _checks.check_fraction(rho, "rho")
    momentum = _checks.check_fraction(momentum, "momentum")
    lo, hi, steps, eps64, eps_t, work, loss_fn, l1_sparsity = (
        a.lo,
        a.hi,
        a.steps,
        a.eps64,
        a.eps,
        a.work,
        a.loss_fn,
        a.l1_sparsity,
    )
    if x.numel() == 0:
        return x.detach().clone()

    skipped = _guard.Skipped(x.shape[0], x.device)
    with _checks.preserve_model_state(model), torch.enable_grad():
        delta = _attack(
            model,
            x,
            y,
            eps_t,
            steps=steps,
            norm=norm,
            loss_fn=loss_fn,
            sign=-1.0 if targeted else 1.0,
            rho=rho,
            momentum=momentum,
            random_start=random_start,
            bounds=(lo, hi),
            l1_sparsity=l1_sparsity,
            generator=generator,
            work=work,
            skipped=skipped,
        )
    skipped.warn("apgd", stacklevel=2)
    return _finalize(x, delta, eps64, norm, (lo, hi))


# ----------------------------------------------------------------------------------------------------------------
# The loop, on flattened (B, n) perturbations in float32 (float64 for float64 inputs). Scores are sign * loss:
# the attack always maximizes them.


def _checkpoints(steps: int) -> list[int]:
    """The iterates ``w_j = ceil(p_j * steps)`` at which l_inf/l_2 APGD may halve its step, ``0 < w_j < steps``.

    Computed in integer hundredths (``p_1 = 0.22``, decrements of 0.03, minimum gap 0.06), so no rounding moves a
    checkpoint: 100 steps give ``[22, 41, 57, 70, 80, 87, 93, 99]``.
    """
    out, q_prev, q = [], 0, 22
    while (w := -(-q * steps // 100)) < steps:
        out.append(w)
        q_prev, q = q, q + max(q - q_prev - 3, 6)
    return sorted(set(out))


def _attack(
    model,
    x,
    y,
    eps,
    *,
    steps,
    norm,
    loss_fn,
    sign,
    rho,
    momentum,
    random_start,
    bounds,
    l1_sparsity,
    generator,
    work,
    skipped,
):
    lo, hi = bounds
    xw = x.detach().flatten(1).to(work)
    lo_d, hi_d = lo - xw, hi - xw  # the box, in perturbation space
    b, n = xw.shape
    if random_start:
        delta = random_in_ball(xw.shape, eps, norm, generator=generator, device=x.device, dtype=work)
        delta = project_delta(delta, lo_d, hi_d, eps, norm)
    else:
        delta = torch.zeros_like(xw)
    if steps == 0:
        return delta

    def evaluate(d: Tensor, with_grad: bool) -> tuple[Tensor, Tensor | None, Tensor]:
        """Per-sample scores at ``d``, if asked their gradient, and where either is NaN/inf."""
        d = d.detach().requires_grad_(with_grad)
        with torch.set_grad_enabled(with_grad):
            loss = loss_fn(model((xw + d).view(x.shape).to(x.dtype)), y)
            if not isinstance(loss, Tensor):
                raise TypeError(f"loss_fn must return a tensor of losses; got {type(loss).__name__}")
            if loss.ndim != 1 or loss.shape[0] != b:
                raise ValueError(f"apgd needs loss_fn to return ({b},) per-sample losses; got {tuple(loss.shape)}")
            score = sign * loss.to(torch.promote_types(loss.dtype, torch.float32))  # float64 losses stay float64
            grad = torch.autograd.grad(score.sum(), d)[0].to(work) if with_grad else None
        bad = _guard.bad_rows(score.detach(), grad)
        skipped.add(bad)
        return score.detach(), grad, bad

    # A sample whose loss or gradient is NaN/inf at an iterate never steps from it: the first iterate gets score
    # -inf (never the best) and a zero gradient (no step), later ones are undone (delta, momentum, gradient and
    # score go back), so the sample retries until a checkpoint halves its step or restarts it from its best point.
    score, grad, bad = evaluate(delta, True)
    score, grad = _guard.finite_score(score, bad), torch.where(bad.unsqueeze(1), 0.0, grad)
    best, best_score, best_grad = delta, score, grad
    prev = delta
    l1 = norm == "l1"
    if l1:
        eta = eps.clone()  # the paper's alpha = 1: an l_1 step of length eps
        frac = torch.full((b,), l1_sparsity, device=x.device, dtype=work)
        nnz_prev = torch.full((b,), float(n), device=x.device, dtype=work)
        every = max(int(0.04 * steps), 1)
        checks = set(range(every, steps, every))
    else:
        eta = 2 * eps
        checks = set(_checkpoints(steps))
        last = 0
        raised = torch.zeros(b, device=x.device, dtype=torch.int64)  # loss-raising steps since the last check
        best_at_last = best_score
        halved_last = torch.zeros(b, device=x.device, dtype=torch.bool)

    for k in range(steps):
        # ---- the step
        if l1:
            kk = (frac * n).floor().clamp(1, n).to(torch.int64)
            step = _sparse_direction(grad, delta, lo_d, hi_d, kk) * eta.unsqueeze(1)
            new = project_delta(delta + step, lo_d, hi_d, eps, norm)
        else:
            z = project_delta(
                delta + _direction(grad, norm, delta, lo_d, hi_d, 1) * eta.unsqueeze(1), lo_d, hi_d, eps, norm
            )
            a = 1.0 if k == 0 else momentum
            new = project_delta(delta + a * (z - delta) + (1 - a) * (delta - prev), lo_d, hi_d, eps, norm)
        new_score, new_grad, bad = evaluate(new, k + 1 < steps)
        keep = bad.unsqueeze(1)
        prev, delta = torch.where(keep, prev, delta), torch.where(keep, delta, new)
        new_score = torch.where(bad, score, new_score)
        grad = None if new_grad is None else torch.where(keep, grad, new_grad)
        up = new_score > score
        score = new_score
        better = score > best_score
        best = torch.where(better.unsqueeze(1), delta, best)
        best_score = torch.where(better, score, best_score)
        if grad is not None:
            best_grad = torch.where(better.unsqueeze(1), grad, best_grad)
        if not l1:
            raised += up
        if k + 1 not in checks:
            continue

        # ---- a checkpoint at iterate k + 1
        if l1:
            nnz = (best != 0).sum(1).to(work)
            restart = nnz < 0.95 * nnz_prev
            frac = nnz / n / 1.5
            eta = torch.where(restart, eps, eta / 1.5)
            eta = torch.minimum(torch.maximum(eta, eps / 10), eps)
            nnz_prev = nnz
        else:
            restart = (raised < rho * (k + 1 - last)) | (~halved_last & (best_score <= best_at_last))
            eta = torch.where(restart, eta / 2, eta)
            last, raised, best_at_last, halved_last = k + 1, torch.zeros_like(raised), best_score, restart
        r = restart.unsqueeze(1)
        delta, grad = torch.where(r, best, delta), torch.where(r, best_grad, grad)
        score = torch.where(restart, best_score, score)
    return best.detach()


def _sparse_direction(g: Tensor, delta: Tensor, lo_d: Tensor, hi_d: Tensor, k: Tensor) -> Tensor:
    """Unit-l_1 ascent step on the ``k[b]`` largest ``|g_i|`` of each row that the box lets move (equal weights)."""
    blocked = ((delta <= lo_d) & (g < 0)) | ((delta >= hi_d) & (g > 0))
    score = g.abs().masked_fill(blocked, 0)
    vals, order = score.sort(1, descending=True)  # a full sort: per-sample k without a host sync
    rank = torch.arange(g.shape[1], device=g.device)
    keep = (rank < k.unsqueeze(1)) & (vals > 0)
    e = torch.zeros_like(g).scatter(1, order, g.gather(1, order).sign() * keep)
    return e / e.abs().sum(1, keepdim=True).clamp_min(1)
