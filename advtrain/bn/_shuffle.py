"""Shuffle-BN: permutations that keep related rows out of one BatchNorm batch, in one process or across ranks."""

from __future__ import annotations

import numbers
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def _check_groups(groups: Any, n: int) -> int:
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral):
        raise TypeError(f"groups must be an int; got {groups!r}")
    if groups < 1:
        raise ValueError(f"groups must be >= 1; got {groups}")
    if n % groups:
        raise ValueError(f"{n} rows do not divide into {groups} equal groups")
    return int(groups)


def shuffle_permutation(sources: Tensor, *, groups: int, generator: torch.Generator | None = None) -> Tensor:
    r"""Draws a row permutation after which rows that share a source id never share a BatchNorm group.

    Rows :math:`1..n` carry source ids :math:`s_i`; the permuted batch ``x[perm]`` is normalized in :math:`G`
    consecutive groups of :math:`m = n / G` rows (devices, or :func:`ghost_bn` groups). The sources are put in a
    uniformly random order, the rows of each source next to each other (in random order), and the sequence is
    dealt round-robin to the groups, whose order is random too. A source with :math:`c` rows therefore lands in

    .. math::
        \min(c, G) \text{ distinct groups, with } \lfloor c/G \rfloor \text{ or } \lceil c/G \rceil
        \text{ of its rows in each.}

    Choose the sources for the leak to stop:

    - an example and its adversarial twins: ``sources = torch.arange(n) % n_src`` for a batch
      ``[x; x_adv]`` (or ``[x_noisy; x_adv]``) of two blocks of ``n_src`` rows: no group holds an example together
      with its own twin (needs :math:`G \ge 2`);
    - shuffle-BN as in MoCo, rows that were normalized together (in the attack's forward) apart from each other
      now: ``sources = torch.arange(n) // m``;
    - a plain random regrouping: ``sources = torch.arange(n)``.

    Args:
        sources: ``(n,)`` integer ids; rows with equal ids are kept apart.
        groups: :math:`G \ge 1`, dividing :math:`n`.
        generator: source of all randomness (CPU or on ``sources``' device).

    Returns:
        ``(n,)`` int64 permutation on ``sources``' device; apply it with ``x[perm]`` (and ``y[perm]``), undo it
        with ``out[invert_permutation(perm)]``.

    Raises:
        TypeError: non-integer ``sources`` or ``groups``.
        ValueError: ``sources`` not 1-D; ``groups < 1`` or not dividing :math:`n`.

    Example:
        >>> import torch
        >>> sources = torch.arange(8) % 4                       # [x; x_adv], 4 examples and their twins
        >>> perm = shuffle_permutation(sources, groups=2, generator=torch.Generator().manual_seed(0))
        >>> [sorted(g.tolist()) for g in sources[perm].view(2, 4)]   # each group: every example once
        [[0, 1, 2, 3], [0, 1, 2, 3]]

    References:
        He et al., "Momentum Contrast for Unsupervised Visual Representation Learning" (shuffling BN),
        arXiv 1911.05722.
        Mei et al., "Fast AdvProp", arXiv 2204.09838.
    """
    if not isinstance(sources, Tensor):
        raise TypeError(f"sources must be a tensor of integer ids; got {type(sources).__name__}")
    if sources.is_floating_point() or sources.is_complex() or sources.dtype == torch.bool:
        raise TypeError(f"sources must be integer ids; got dtype {sources.dtype}")
    if sources.ndim != 1:
        raise ValueError(f"sources must be (n,); got shape {tuple(sources.shape)}")
    n = sources.shape[0]
    groups = _check_groups(groups, n)
    device = sources.device
    gdev = generator.device if generator is not None else device
    _, ids = torch.unique(sources, return_inverse=True)
    n_src = int(ids.max()) + 1 if n else 0
    source_rank = torch.randperm(n_src, generator=generator, device=gdev).to(device)[ids]
    tie = torch.randperm(n, generator=generator, device=gdev).to(device)
    order = torch.argsort(source_rank * n + tie)  # sources contiguous, in random order; rows in random order
    dealt = torch.arange(n, device=device).view(n // groups, groups).t()  # row g: positions g, g + G, ...
    group_order = torch.randperm(groups, generator=generator, device=gdev).to(device)
    return order[dealt[group_order].reshape(-1)]


def invert_permutation(perm: Tensor) -> Tensor:
    r"""The inverse of a permutation: ``x[perm][invert_permutation(perm)] == x``.

    .. math::
        \pi^{-1}[\pi[i]] = i

    Args:
        perm: ``(n,)`` int64 permutation of ``0..n-1``.

    Returns:
        ``(n,)`` int64 inverse permutation, on ``perm``'s device.

    Raises:
        TypeError: ``perm`` is not an integer tensor.
        ValueError: ``perm`` is not a 1-D permutation of ``0..n-1``.

    Example:
        >>> import torch
        >>> perm = torch.tensor([2, 0, 1])
        >>> invert_permutation(perm).tolist()
        [1, 2, 0]
    """
    if not isinstance(perm, Tensor) or perm.is_floating_point() or perm.is_complex() or perm.dtype == torch.bool:
        raise TypeError(f"perm must be an integer tensor; got {getattr(perm, 'dtype', type(perm).__name__)}")
    if perm.ndim != 1:
        raise ValueError(f"perm must be (n,); got shape {tuple(perm.shape)}")
    n = perm.shape[0]
    arange = torch.arange(n, device=perm.device)
    if not torch.equal(torch.sort(perm.long()).values, arange):
        raise ValueError(f"perm is not a permutation of 0..{n - 1}")
    inv = torch.empty_like(arange)
    inv[perm.long()] = arange
    return inv


# ----------------------------------------------------------------------------------------------------------------
# Across ranks: all_gather, take this rank's rows of the permuted global batch; the inverse does the same.


def _world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shuffling across ranks needs torch.distributed to be initialized")
    return dist.get_world_size(group), dist.get_rank(group)


def _gather_rows(x: Tensor, perm: Tensor, group) -> Tensor:
    world, rank = _world(group)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    n = x.shape[0]
    return torch.cat(parts)[perm[rank * n : (rank + 1) * n].to(x.device)]


class _ExchangeRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, perm: Tensor, group) -> Tensor:
        ctx.perm, ctx.group = perm, group
        return _gather_rows(x, perm, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # rows moved by perm; their gradients move back by its inverse
        return _gather_rows(grad.contiguous(), invert_permutation(ctx.perm), ctx.group), None, None


def exchange_rows(x: Tensor, perm: Tensor, *, group: Any = None) -> Tensor:
    r"""This rank's rows of the global batch after a permutation: rows :math:`rn .. (r+1)n - 1` of ``X[perm]``.

    The global batch :math:`X` stacks every rank's ``x`` in rank order (:math:`W` ranks, :math:`n` rows each);
    rank :math:`r` gets

    .. math::
        x'_r = X[\pi[rn:(r+1)n]].

    Differentiable: the gradient travels back through the inverse permutation (one ``all_gather`` each way, which
    every backend, gloo included, supports). Every rank must call it (and the backward) with the same ``perm``.

    Args:
        x: ``(n, ...)`` rows on this rank; the same shape on every rank.
        perm: ``(W n,)`` int64 permutation, identical on every rank (e.g. from :func:`shuffle_across_ranks`).
        group: the process group (default: the world).

    Returns:
        ``(n, ...)`` tensor of ``x``'s dtype and device.

    Raises:
        RuntimeError: torch.distributed is not initialized.
        ValueError: ``perm`` does not have ``W n`` entries.

    Example:
        >>> import tempfile, torch, torch.distributed as dist
        >>> dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
        >>> exchange_rows(torch.tensor([[10.0], [11.0], [12.0]]), torch.tensor([2, 0, 1])).flatten().tolist()
        [12.0, 10.0, 11.0]
        >>> dist.destroy_process_group()

    References:
        He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", arXiv 1911.05722.
    """
    world, _ = _world(group)
    if perm.ndim != 1 or perm.shape[0] != world * x.shape[0]:
        raise ValueError(
            f"perm must have world_size * n = {world} * {x.shape[0]} entries; got shape {tuple(perm.shape)}"
        )
    return _ExchangeRows.apply(x, perm, group)


def shuffle_across_ranks(
    x: Tensor, *, generator: torch.Generator | None = None, sources: Tensor | None = None, group: Any = None
) -> tuple[Tensor, Tensor]:
    r"""Shuffle-BN across ranks: gathers every rank's rows, permutes them, and hands each rank ``n`` of them.

    Each rank's BatchNorm (no SyncBatchNorm) then normalizes rows that mostly came from other ranks. The
    permutation is :func:`shuffle_permutation` of the :math:`W n` global rows into :math:`W` groups (the ranks):
    by default every row's source is its rank, so each rank's rows are spread evenly over all ranks (at most
    :math:`\lceil n/W \rceil` of them stay together); with ``sources``, rows of one rank that share an id
    (an example and its adversarial twin) land on different ranks. It is drawn from ``generator`` on every rank
    (which keeps equally seeded generators in step) and rank 0's draw is broadcast, so all ranks agree on it.

    Apply the same permutation to the labels with :func:`exchange_rows` (or undo it on the outputs with
    :func:`unshuffle_across_ranks`):

    .. math::
        x'_r = X[\pi[rn:(r+1)n]],\qquad y'_r = Y[\pi[rn:(r+1)n]].

    Args:
        x: ``(n, ...)`` rows on this rank, e.g. adversarial images; the same ``n`` on every rank.
        generator: source of the permutation.
        sources: optional ``(n,)`` integer ids in ``[0, n)`` of this rank's rows; rows of this rank with equal ids
            never end up on one rank (needs at most :math:`W` rows per id).
        group: the process group (default: the world).

    Returns:
        ``(x_shuffled, perm)``: ``(n, ...)`` rows for this rank (differentiable in ``x``) and the ``(W n,)`` int64
        permutation, identical on every rank.

    Raises:
        RuntimeError: torch.distributed is not initialized.
        ValueError: ranks hold different numbers of rows; ``sources`` of the wrong shape or outside ``[0, n)``.

    Example:
        >>> import tempfile, torch, torch.distributed as dist
        >>> dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
        >>> x = torch.arange(6.0).view(3, 2)
        >>> x_shuffled, perm = shuffle_across_ranks(x, generator=torch.Generator().manual_seed(0))
        >>> torch.equal(x_shuffled, x[perm]), torch.equal(unshuffle_across_ranks(x_shuffled, perm), x)
        (True, True)
        >>> dist.destroy_process_group()

    References:
        He et al., "Momentum Contrast for Unsupervised Visual Representation Learning" (shuffling BN),
        arXiv 1911.05722.
        Mei et al., "Fast AdvProp", arXiv 2204.09838.
    """
    world, rank = _world(group)
    n = x.shape[0]
    sizes = [torch.zeros(1, dtype=torch.int64, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.int64, device=x.device), group=group)
    sizes_list = [int(s) for s in sizes]
    if any(s != n for s in sizes_list):
        raise ValueError(f"shuffle_across_ranks needs the same number of rows on every rank; got {sizes_list}")
    if sources is None:
        global_sources = torch.arange(world, device=x.device).repeat_interleave(n)
    else:
        if sources.ndim != 1 or sources.shape[0] != n:
            raise ValueError(f"sources must be ({n},) like x's rows; got shape {tuple(sources.shape)}")
        if n and (int(sources.min()) < 0 or int(sources.max()) >= n):
            raise ValueError(f"sources must lie in [0, {n}); got min {int(sources.min())}, max {int(sources.max())}")
        local = (sources.to(device=x.device, dtype=torch.int64) + rank * n).contiguous()
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local, group=group)
        global_sources = torch.cat(parts)
    perm = shuffle_permutation(global_sources, groups=world, generator=generator).contiguous()
    src = 0 if group is None else dist.get_global_rank(group, 0)
    dist.broadcast(perm, src=src, group=group)
    return exchange_rows(x, perm, group=group), perm


def unshuffle_across_ranks(y: Tensor, perm: Tensor, *, group: Any = None) -> Tensor:
    r"""Undoes :func:`shuffle_across_ranks` on outputs: each rank gets back the rows of its original inputs.

    .. math::
        y_r = Y'[\pi^{-1}[rn:(r+1)n]]

    Differentiable, so a loss against this rank's own labels trains through it.

    Args:
        y: ``(n, ...)`` outputs of this rank's shuffled rows (logits, features).
        perm: the permutation :func:`shuffle_across_ranks` returned.
        group: the process group (default: the world).

    Returns:
        ``(n, ...)`` rows in this rank's original order.

    Raises:
        RuntimeError: torch.distributed is not initialized.
        ValueError: ``perm`` is not a permutation of ``W n`` rows.

    Example:
        >>> import tempfile, torch, torch.distributed as dist
        >>> dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
        >>> y = torch.tensor([[1.0], [2.0], [3.0]])
        >>> unshuffle_across_ranks(y, torch.tensor([2, 0, 1])).flatten().tolist()
        [2.0, 3.0, 1.0]
        >>> dist.destroy_process_group()

    References:
        He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", arXiv 1911.05722.
    """
    return exchange_rows(y, invert_permutation(perm), group=group)
