"""Features of the global batch across data-parallel ranks, for contrastive losses whose negatives span all ranks."""

from __future__ import annotations

import numbers

import torch
import torch.distributed as dist
from torch import Tensor


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """The number of ranks in ``group`` (the default group), or 1 when no process group is initialized.

    Example:
        >>> world_size()
        1
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group)


def _check_rows(x: Tensor, group: dist.ProcessGroup | None) -> None:
    """Every rank holds a tensor of the same shape (all_gather needs it): one small all_gather of the shapes."""
    if not isinstance(x, Tensor):
        raise TypeError(f"features must be a torch.Tensor; got {type(x).__name__}")
    if x.ndim < 1:
        raise ValueError(f"features must be (B, ...) with a batch dimension; got shape {tuple(x.shape)}")
    if x.ndim > 8:
        raise ValueError(f"features with more than 8 dimensions are not supported; got shape {tuple(x.shape)}")
    world = world_size(group)
    shape = torch.tensor([x.ndim, *x.shape, *([0] * (8 - x.ndim))], dtype=torch.int64, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    seen = [tuple(s[1 : 1 + int(s[0])].tolist()) for s in shapes]
    if len(set(seen)) != 1:
        raise ValueError(f"every rank must gather features of one shape; got {seen} (by rank)")


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


def scale_grad(x: Tensor, *, scale: float) -> Tensor:
    r"""``x`` unchanged in the forward pass, its gradient multiplied by ``scale`` in the backward pass.

    Used by :func:`gather_features` to undo the data-parallel gradient average (``scale = world``) for a loss that
    every rank computes in full on the gathered global batch.

    Args:
        x: any tensor.
        scale: the gradient factor, finite.

    Returns:
        A tensor equal to ``x`` whose gradient is ``scale`` times the gradient it receives.

    Example:
        >>> x = torch.ones(2, requires_grad=True)
        >>> scale_grad(x, scale=3.0).sum().backward()
        >>> x.grad.tolist()
        [3.0, 3.0]
    """
    if not (isinstance(scale, numbers.Real) and torch.isfinite(torch.tensor(float(scale)))):
        raise ValueError(f"scale must be a finite number; got {scale!r}")
    return _ScaleGrad.apply(x, float(scale))


def gather_features(features: Tensor, *, group: dist.ProcessGroup | None = None, grad_scale: float = 1.0) -> Tensor:
    r"""All-gathers ``(B, ...)`` features from every rank into the ``(W B, ...)`` global batch, rows ordered by rank.

    Rows ``[r B, (r + 1) B)`` of the result are this rank's ``features`` themselves (rank :math:`r`), so autograd
    flows to them; the other ranks' rows are copies without a graph (``all_gather`` has no backward). This is
    open_clip's ``gather_features`` with ``gather_with_grad=False``: a loss computed on the gathered batch has, on
    each rank, the exact gradient of that loss with respect to the local rows, and no gradient reaches the other
    ranks' rows (each rank computes their share itself).

    Data-parallel wrappers (DDP, FSDP) *average* gradients over the :math:`W` ranks. When every rank computes the
    same global loss :math:`L` and differentiates it only through its own rows, that average is
    :math:`\frac1W \sum_r \partial L / \partial f_r \cdot \partial f_r / \partial\theta`, i.e. :math:`\frac1W` of the
    global-batch gradient. ``grad_scale=W`` multiplies the local rows' gradient by :math:`W` (:func:`scale_grad`), so
    that the average is exactly the gradient one process holding the global batch would compute. (Parameters that
    reach the loss on every rank in full, such as a temperature, need no factor: their per-rank gradients are all the
    global one already.)

    A collective: every rank of ``group`` must call it, in the same order, with features of the same shape (checked
    with one extra small ``all_gather`` of the shapes; a mismatch raises on every rank). Do not call it where ranks
    may take different paths (an attack's inner loop, or evaluation batches of uneven size). Without an initialized
    process group, or with one rank, it returns ``features`` itself (``grad_scale`` does not apply).

    Args:
        features: ``(B, ...)`` this rank's rows, any dtype and device the backend supports (NCCL: CUDA tensors).
        group: the process group (default: the default group).
        grad_scale: factor on the gradient of the local rows; ``world_size(group)`` for a loss that is the same
            global loss on every rank under DDP / FSDP's gradient average, 1 for the plain gathered gradient.

    Returns:
        ``(W B, ...)`` on ``features``' device and dtype.

    Raises:
        TypeError: ``features`` not a tensor.
        ValueError: a 0-dim tensor, ranks with different shapes, or a non-finite ``grad_scale``.

    Example:
        >>> f = torch.randn(4, 8)
        >>> gather_features(f) is f  # one process: nothing to gather
        True

    References:
        Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", arXiv 2103.00020.
        Cherti et al., "Reproducible scaling laws for contrastive language-image learning" (open_clip),
        arXiv 2212.07143.
    """
    world = world_size(group)
    if world == 1:
        if not isinstance(features, Tensor):
            raise TypeError(f"features must be a torch.Tensor; got {type(features).__name__}")
        return features
    _check_rows(features, group)
    parts = [torch.empty_like(features) for _ in range(world)]
    dist.all_gather(parts, features.detach().contiguous(), group=group)
    parts[_rank(group)] = features if grad_scale == 1 else scale_grad(features, scale=grad_scale)
    return torch.cat(parts)


def gather_other_ranks(features: Tensor, *, group: dist.ProcessGroup | None = None) -> Tensor:
    r"""The other ranks' ``(B, ...)`` features, concatenated in rank order and detached: ``((W - 1) B, ...)``.

    The global batch of :func:`gather_features` without this rank's own rows, for use as extra negatives (e.g. the
    global batch's caption features in a contrastive attack, see :func:`contrastive_attack_loss`). A collective, as
    :func:`gather_features`; call it once, before an inner loop, so that the loop itself needs none. With one rank
    (or no process group) it is an empty ``(0, ...)`` tensor.

    Args:
        features: ``(B, ...)`` this rank's rows.
        group: the process group (default: the default group).

    Returns:
        ``((W - 1) B, ...)``, detached, on ``features``' device and dtype.

    Raises:
        TypeError, ValueError: as :func:`gather_features`.

    Example:
        >>> gather_other_ranks(torch.randn(4, 8)).shape
        torch.Size([0, 8])
    """
    world = world_size(group)
    if world == 1:
        if not isinstance(features, Tensor):
            raise TypeError(f"features must be a torch.Tensor; got {type(features).__name__}")
        if features.ndim < 1:
            raise ValueError(f"features must be (B, ...) with a batch dimension; got shape {tuple(features.shape)}")
        return features.detach()[:0]
    _check_rows(features, group)
    parts = [torch.empty_like(features) for _ in range(world)]
    dist.all_gather(parts, features.detach().contiguous(), group=group)
    del parts[_rank(group)]
    return torch.cat(parts)
