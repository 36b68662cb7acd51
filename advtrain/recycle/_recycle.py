"""Gradient recycling (Free AT, Fast AdvProp): one backward on x + delta serves the weights and the next delta."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from advtrain.bn import split_parameters
from advtrain.losses import cross_entropy


class Recycled(NamedTuple):
    """What :func:`recycled_step` returns."""

    loss: Tensor
    """``(B,)`` detached per-sample losses (or the detached scalar a custom ``loss_fn`` returned)."""
    grad: Tensor
    r"""Input gradient :math:`\nabla_\delta \sum_i \ell_i`, ``delta``'s shape, detached."""
    output: Tensor
    """Detached model output on ``x + delta`` (logits: accuracy of the pass at no extra cost)."""


def _default_loss(output: Tensor, y: Tensor) -> Tensor:
    return cross_entropy(output, y, reduction="none")


def _check_weight(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number; got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0; got {value}")
    return float(value)


def recycled_step(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Any,
    delta: Tensor,
    *,
    beta: float,
    loss_fn: Callable[[Tensor, Any], Tensor] | None = None,
) -> Recycled:
    r"""One forward/backward on ``x + delta``: beta-weighted weight gradients and the next step's input gradient.

    With per-sample losses :math:`\ell_i = \ell(f_\theta(x_i + \delta_i), y_i)` and :math:`L = \sum_i \ell_i`:

    .. math::
        \texttt{p.grad} \mathrel{+}= \beta\, \nabla_\theta L,\qquad
        g = \nabla_\delta L,

    from a single backward. The caller makes the next perturbation from :math:`g`, e.g. Fast AdvProp's PGD-1
    :math:`\delta' = \Pi_\epsilon(\delta + \alpha\,\mathrm{sign}(g))` from a random :math:`\delta`, or Free AT's
    replay. The sum (not the mean) keeps the weighting explicit: divide by the weighted sample counts afterwards
    with :func:`sync_update_speed_`. The model runs in whatever mode and BN route it is in (train-mode BatchNorm
    couples the samples; :math:`g` is then the gradient of the batch's total loss, as the paper uses it).

    Args:
        model: maps ``x``-shaped inputs to outputs; an ``nn.Module`` or a DDP wrapper (under DDP the backward
            all-reduces unless it runs inside :func:`maybe_no_sync`).
        x: ``(B, ...)`` floating inputs (pixels; no box check here, the attack's projection keeps ``x + delta``
            valid).
        y: targets for ``loss_fn``.
        delta: ``x``-shaped perturbation (detached inside; its own ``.grad`` is never touched).
        beta: :math:`\beta > 0`, the importance of this pass's weight gradients (Fast AdvProp: 0.5 for the noisy
            pass).
        loss_fn: ``loss_fn(output, y)`` returning ``(B,)`` per-sample losses (a scalar is taken as :math:`L`).
            Default: cross-entropy with hard or soft targets.

    Returns:
        ``Recycled(loss, grad, output)``, all detached; ``grad`` has ``delta``'s shape and ``x``'s dtype.

    Raises:
        TypeError: non-tensor or integer ``x``/``delta``; non-numeric ``beta``; the default loss with non-tensor
            ``y``.
        ValueError: ``delta`` of another shape than ``x``; ``beta <= 0`` or not finite (for :math:`\beta = 0`
            use :func:`advtrain.pgd`, which writes no ``.grad``); a loss of the wrong shape.
        RuntimeError: inside ``torch.inference_mode()`` or ``torch.no_grad()``.

    Side effects:
        Writes ``.grad``: adds :math:`\beta \nabla_\theta L` to the ``.grad`` of every parameter that
        requires grad and takes part in the forward (creating ``.grad`` where it is ``None``). A train-mode forward
        updates BatchNorm running statistics, as any training forward does. Under DDP outside ``no_sync`` the
        backward all-reduces the accumulated gradients.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2, bias=False)
        >>> x, y, delta = torch.zeros(1, 3), torch.tensor([0]), torch.zeros(1, 3)
        >>> step = recycled_step(model, x, y, delta, beta=0.5)
        >>> torch.allclose(step.grad, 0.5 * (model.weight[1] - model.weight[0]).detach().view(1, 3))
        True
        >>> torch.allclose(model.weight.grad, torch.zeros(2, 3))  # x + delta = 0: no weight gradient
        True

    References:
        Shafahi et al., "Adversarial Training for Free!", arXiv 1904.12843.
        Mei et al., "Fast AdvProp", arXiv 2204.09838 (Algorithm 1).
    """
    if not callable(model):
        raise TypeError(f"model must be callable; got {type(model).__name__}")
    for name, t in (("x", x), ("delta", delta)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating; got dtype {t.dtype}")
    if delta.shape != x.shape:
        raise ValueError(f"delta must have x's shape {tuple(x.shape)}; got {tuple(delta.shape)}")
    beta = _check_weight(beta, "beta")
    if beta == 0:
        raise ValueError("beta must be > 0; for beta = 0 (no recycling) use advtrain.pgd, which writes no .grad")
    if loss_fn is None:
        if not isinstance(y, Tensor):
            raise TypeError(f"the default loss needs y as a tensor of labels or soft targets; got {type(y).__name__}")
        loss_fn = _default_loss
    if torch.is_inference_mode_enabled() or not torch.is_grad_enabled():
        raise RuntimeError("recycled_step needs autograd; call it outside torch.no_grad() and torch.inference_mode()")

    d = delta.detach().to(x.dtype).requires_grad_(True)
    output = model(x.detach() + d)
    loss = loss_fn(output, y)
    if loss.ndim == 1 and loss.shape[0] == x.shape[0]:
        total = loss.sum()
    elif loss.ndim == 0:
        total = loss
    else:
        raise ValueError(
            f"loss_fn must return ({x.shape[0]},) per-sample losses or a scalar; got shape {tuple(loss.shape)}"
        )
    (beta * total).backward()  # one backward: beta * grad into every parameter's .grad, and into d.grad
    grad = d.grad / beta if d.grad is not None else torch.zeros_like(d)
    return Recycled(loss.detach(), grad.detach(), output.detach())


def _grads(params: Iterable[nn.Parameter] | nn.Module) -> list[Tensor]:
    if isinstance(params, nn.Module):
        params = params.parameters()
    if isinstance(params, Tensor):
        raise TypeError("params must be an iterable of parameters or an nn.Module, not a single tensor")
    return [p.grad for p in params if p.grad is not None]


def scale_grads_(params: Iterable[nn.Parameter] | nn.Module, factor: float) -> None:
    r"""Multiplies the gradients of ``params`` by ``factor``, in place (re-weighting a pass or a group).

    .. math::
        \texttt{p.grad} \leftarrow c\, \texttt{p.grad}

    Args:
        params: parameters (an iterable, e.g. a group of :func:`advtrain.bn.split_parameters`) or a module.
        factor: :math:`c \ge 0`, finite.

    Raises:
        TypeError: non-numeric ``factor``, or a single tensor for ``params``.
        ValueError: negative or non-finite ``factor``.

    Side effects:
        Writes ``.grad`` in place; parameters whose ``.grad`` is ``None`` are skipped.

    Example:
        >>> import torch
        >>> p = torch.nn.Parameter(torch.ones(2))
        >>> p.grad = torch.tensor([2.0, 4.0])
        >>> scale_grads_([p], 0.5)
        >>> p.grad.tolist()
        [1.0, 2.0]

    References:
        Mei et al., "Fast AdvProp", arXiv 2204.09838 (re-balancing training samples).
    """
    factor = _check_weight(factor, "factor")
    grads = _grads(params)
    if grads:
        torch._foreach_mul_(grads, factor)


class UpdateCounts(NamedTuple):
    """The weighted sample counts that :func:`sync_update_speed_` divided each parameter group by."""

    shared: float
    clean: float
    aux: float


def sync_update_speed_(model: nn.Module, *, n_clean: float, n_aux: float) -> UpdateCounts:
    r"""Divides each parameter group's summed gradient by the weighted number of samples that reached it.

    Fast AdvProp sums per-sample losses, each pass weighted (clean :math:`w_c`, recycled noisy pass
    :math:`\beta`, adversarial pass :math:`w_a`), and then averages every parameter's gradient over the samples
    that touched it, so that shared, clean-only and adversarial-only parameters update at the same speed. With
    :math:`N_c = w_c B_c` and :math:`N_a = \beta B_n + w_a B_a` (batch sizes :math:`B`):

    .. math::
        g_{shared} \leftarrow \frac{g_{shared}}{N_c + N_a},\qquad
        g_{clean} \leftarrow \frac{g_{clean}}{N_c},\qquad
        g_{aux} \leftarrow \frac{g_{aux}}{N_a},

    with the groups of :func:`advtrain.bn.split_parameters` (main-BN parameters are clean, auxiliary-BN ones
    aux, the rest shared). A group whose count is 0 received no sample and is left as it is. Under DDP give this
    rank's counts (the same on every rank): DDP's all-reduce already averaged over ranks.

    Args:
        model: the split-BN model (or any module: without split BNs all parameters are shared).
        n_clean: :math:`N_c \ge 0`, weighted count of samples routed through the main BNs.
        n_aux: :math:`N_a \ge 0`, weighted count of samples routed through the auxiliary BNs.

    Returns:
        ``UpdateCounts(shared, clean, aux)``: the three divisors.

    Raises:
        TypeError: non-numeric counts.
        ValueError: negative or non-finite counts.

    Side effects:
        Writes ``.grad`` in place (divides it); parameters whose ``.grad`` is ``None`` are skipped.

    Example:
        >>> import torch
        >>> from advtrain.bn import convert_split_bn_
        >>> model = convert_split_bn_(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)))
        >>> for p in model.parameters():
        ...     p.grad = torch.full_like(p, 30.0)
        >>> sync_update_speed_(model, n_clean=4, n_aux=0.5 * 4 + 1 * 4)  # 4 clean; 4 noisy (beta 0.5), 4 adv
        UpdateCounts(shared=10.0, clean=4.0, aux=6.0)
        >>> model[0].weight.grad[0, 0].item(), model[1].weight.grad[0].item(), model[1].aux.weight.grad[0].item()
        (3.0, 7.5, 5.0)

    References:
        Mei et al., "Fast AdvProp", arXiv 2204.09838 (synchronizing the parameter updating speed).
    """
    n_clean = _check_weight(n_clean, "n_clean")
    n_aux = _check_weight(n_aux, "n_aux")
    groups = split_parameters(model)
    counts = UpdateCounts(n_clean + n_aux, n_clean, n_aux)
    for params, count in zip(groups, counts):
        grads = _grads(params)
        if grads and count > 0:
            torch._foreach_div_(grads, count)
    return counts


@contextmanager
def maybe_no_sync(model: nn.Module, *, enabled: bool) -> Iterator[None]:
    r"""``model.no_sync()`` when ``enabled`` and ``model`` is DistributedDataParallel; otherwise nothing.

    A Fast AdvProp step runs several backward passes (clean, recycled noisy, adversarial) into the same
    ``.grad``; only the last needs to all-reduce, since the all-reduce is linear:

    .. math::
        \frac{1}{W}\sum_{r} \sum_{k} g_{r,k} = \sum_k \frac{1}{W} \sum_r g_{r,k}.

    Wrap the forward and the backward of every pass but the last (DDP decides at forward time whether the
    backward will synchronize). Gradients accumulated inside are all-reduced by the first synchronized backward,
    including those of parameters it does not use (construct DDP with ``find_unused_parameters=True``, since the
    clean and adversarial passes use different BNs).

    Args:
        model: any module; only ``DistributedDataParallel`` is affected.
        enabled: skip the all-reduce in this block (``True`` for every pass but the last).

    Returns:
        A context manager.

    Side effects:
        None by itself; inside the block, DDP backward passes accumulate ``.grad`` locally without communicating.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> with maybe_no_sync(model, enabled=True):  # not DDP: nothing changes
        ...     model(torch.ones(1, 2)).sum().backward()
        >>> model.bias.grad.item()
        1.0

    References:
        Li et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel Training", arXiv 2006.15704.
        Mei et al., "Fast AdvProp", arXiv 2204.09838.
    """
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    with model.no_sync() if (enabled and ddp) else nullcontext():
        yield
