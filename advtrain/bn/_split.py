"""Split BatchNorm: a main BN for clean images beside an auxiliary BN for noisy and adversarial ones (AdvProp)."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

Route = Literal["clean", "adv"]


class SplitBatchNorm(_BatchNorm):
    r"""A BatchNorm whose own parameters and buffers are the main (clean) BN, with an auxiliary BN at ``aux_bn.0``.

    The main BN keeps the state-dict keys of the BatchNorm it replaced (``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``); the auxiliary BN's keys are ``aux_bn.0.*``, as in timm's
    ``SplitBatchNorm2d`` with ``num_splits=2``, so checkpoints move between the two. Which BN normalizes a batch
    is the module's ``route``, set by :func:`bn_route`, in train and eval mode alike:

    .. math::
        \mathrm{BN}_{split}(x) = \begin{cases}
        \mathrm{BN}_{main}(x) & \text{route } \texttt{"clean"} \\
        \mathrm{BN}_{aux}(x) & \text{route } \texttt{"adv"} \\
        [\mathrm{BN}_{main}(x_{1:n_c});\ \mathrm{BN}_{aux}(x_{n_c+1:n_c+n_a})] & \text{route } (n_c, n_a)
        \end{cases}

    With ``ghost_groups`` :math:`G > 1` (set by :func:`ghost_bn`), each route's rows are normalized in :math:`G`
    consecutive groups with their own batch statistics, as :math:`G` devices without SyncBatchNorm would.

    Build one with :func:`convert_split_bn_`; the concrete classes are :class:`SplitBatchNorm1d`,
    :class:`SplitBatchNorm2d`, :class:`SplitBatchNorm3d` and :class:`SplitSyncBatchNorm`.

    References:
        Xie et al., "Adversarial Examples Improve Image Recognition", arXiv 1911.09665.
        Mei et al., "Fast AdvProp", arXiv 2204.09838.
    """

    route: Route | tuple[int, int]
    ghost_groups: int
    aux_bn: nn.ModuleList

    @property
    def aux(self) -> _BatchNorm:
        """The auxiliary BatchNorm (``aux_bn[0]``)."""
        return self.aux_bn[0]

    def forward(self, x: Tensor) -> Tensor:
        main = super().forward
        match self.route:
            case "clean":
                return _normalize(self, main, x, self.ghost_groups)
            case "adv":
                return _normalize(self.aux, self.aux, x, self.ghost_groups)
            case (n_clean, n_aux):
                if x.shape[0] != n_clean + n_aux:
                    raise ValueError(
                        f"bn_route split=({n_clean}, {n_aux}) needs a batch of {n_clean + n_aux} rows; "
                        f"got input of shape {tuple(x.shape)}"
                    )
                parts = []
                if n_clean:
                    parts.append(_normalize(self, main, x[:n_clean], self.ghost_groups))
                if n_aux:
                    parts.append(_normalize(self.aux, self.aux, x[n_clean:], self.ghost_groups))
                return torch.cat(parts) if len(parts) > 1 else parts[0]
        raise ValueError(f"unknown route {self.route!r}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint of the unconverted model has no aux_bn keys: the auxiliary BN starts as a copy of the main
        # one, exactly as convert_split_bn_ builds it.
        aux_prefix = prefix + "aux_bn.0."
        if not any(k.startswith(aux_prefix) for k in state_dict):
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                if prefix + name in state_dict:
                    state_dict[aux_prefix + name] = state_dict[prefix + name]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, route={self.route!r}, ghost_groups={self.ghost_groups}"


class SplitBatchNorm1d(SplitBatchNorm, nn.BatchNorm1d):
    """:class:`SplitBatchNorm` of an ``nn.BatchNorm1d``: inputs ``(B, C)`` or ``(B, C, L)``."""


class SplitBatchNorm2d(SplitBatchNorm, nn.BatchNorm2d):
    """:class:`SplitBatchNorm` of an ``nn.BatchNorm2d``: inputs ``(B, C, H, W)``."""


class SplitBatchNorm3d(SplitBatchNorm, nn.BatchNorm3d):
    """:class:`SplitBatchNorm` of an ``nn.BatchNorm3d``: inputs ``(B, C, D, H, W)``."""


class SplitSyncBatchNorm(SplitBatchNorm, nn.SyncBatchNorm):
    """:class:`SplitBatchNorm` of an ``nn.SyncBatchNorm``: both routes synchronize over its process group."""


def _split_class(bn: nn.Module) -> type[SplitBatchNorm]:
    match type(bn):
        case nn.BatchNorm1d:
            return SplitBatchNorm1d
        case nn.BatchNorm2d:
            return SplitBatchNorm2d
        case nn.BatchNorm3d:
            return SplitBatchNorm3d
        case nn.SyncBatchNorm:
            return SplitSyncBatchNorm
    raise TypeError(
        f"convert_split_bn_ handles exactly BatchNorm1d/2d/3d and SyncBatchNorm; got {type(bn).__name__} "
        f"(a subclass may add behaviour, such as timm's BatchNormAct2d activation, that a split BN would drop)"
    )


def _plain_class(bn: SplitBatchNorm) -> type[_BatchNorm]:
    match bn:
        case SplitBatchNorm1d():
            return nn.BatchNorm1d
        case SplitBatchNorm2d():
            return nn.BatchNorm2d
        case SplitBatchNorm3d():
            return nn.BatchNorm3d
        case SplitSyncBatchNorm():
            return nn.SyncBatchNorm
    raise TypeError(f"unknown split BatchNorm {type(bn).__name__}")


def _rebuild(cls: type[_BatchNorm], bn: _BatchNorm, *, clone: bool = False) -> _BatchNorm:
    """A ``cls`` module with ``bn``'s hyperparameters that holds ``bn``'s own tensors, or copies of them."""
    kw: dict[str, Any] = dict(
        eps=bn.eps, momentum=bn.momentum, affine=bn.affine, track_running_stats=bn.track_running_stats
    )
    if issubclass(cls, nn.SyncBatchNorm):
        kw["process_group"] = getattr(bn, "process_group", None)
    new = cls(bn.num_features, device="meta", **kw)  # meta: nothing is allocated before the tensors are swapped in
    for name in ("weight", "bias"):
        p = getattr(bn, name)
        if clone and p is not None:
            p = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        setattr(new, name, p)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        b = getattr(bn, name)
        setattr(new, name, b.detach().clone() if clone and b is not None else b)
    new.train(bn.training)
    return new


def _replace(
    model: nn.Module, want: Callable[[nn.Module], bool], make: Callable[[nn.Module], nn.Module], name: str
) -> nn.Module:
    if want(model):
        raise TypeError(
            f"{name} replaces modules inside a model; the model itself is a {type(model).__name__}: "
            f"wrap it, e.g. nn.Sequential(bn)"
        )
    memo: dict[int, nn.Module] = {}
    todo = []
    stack = [model]
    while stack:  # parents first; never descend into a split BN (its aux_bn is a plain BatchNorm)
        parent = stack.pop()
        for child_name, child in parent._modules.items():  # not named_children(): it hides repeated children
            if child is None:
                continue
            if want(child):
                todo.append((parent, child_name, child))
            elif not isinstance(child, SplitBatchNorm):
                stack.append(child)
    for parent, child_name, child in todo:
        if id(child) not in memo:  # a module shared by two parents stays shared
            memo[id(child)] = make(child)
        setattr(parent, child_name, memo[id(child)])
    return model


def convert_split_bn_(model: nn.Module) -> nn.Module:
    r"""Puts an auxiliary BatchNorm beside every BatchNorm of ``model``, in place (AdvProp's disentangled BN).

    Every ``nn.BatchNorm1d``/``2d``/``3d`` and ``nn.SyncBatchNorm`` becomes the matching :class:`SplitBatchNorm`:
    the main BN is the original one (the very same parameter and buffer tensors, so an optimizer built before the
    conversion still updates it, and its state-dict keys are unchanged), and the auxiliary BN at ``.aux_bn.0`` is
    a copy of it:

    .. math::
        \gamma_{aux} \leftarrow \gamma,\quad \beta_{aux} \leftarrow \beta,\quad
        \mu_{aux} \leftarrow \mu,\quad \sigma^2_{aux} \leftarrow \sigma^2.

    The route starts as ``"clean"``, so the converted model computes what the original did until
    :func:`bn_route` says otherwise. Converting again is a no-op; :func:`revert_split_bn_` undoes it. A checkpoint
    of the unconverted model loads into the converted one (its aux BNs then start as copies of the main ones).

    Args:
        model: a module that contains BatchNorms (not itself a BatchNorm).

    Returns:
        ``model``, converted.

    Raises:
        TypeError: ``model`` is itself a BatchNorm (wrap it first), or holds a subclass of a BatchNorm other
            than the four above (timm's ``BatchNormAct2d``, say), whose extra behaviour a split BN would drop.

    Side effects:
        Replaces submodules of ``model``; parameters, buffers and ``.grad`` of the main BNs are untouched. New
        auxiliary parameters are added: build the optimizer after the conversion, or add them to it.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        >>> keys = set(model.state_dict())
        >>> model = convert_split_bn_(model)
        >>> sorted(set(model.state_dict()) - keys)[:2]
        ['1.aux_bn.0.bias', '1.aux_bn.0.num_batches_tracked']
        >>> keys < set(model.state_dict()), type(model[1]).__name__
        (True, 'SplitBatchNorm2d')

    References:
        Xie et al., "Adversarial Examples Improve Image Recognition", arXiv 1911.09665.
        Mei et al., "Fast AdvProp", arXiv 2204.09838.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")

    def want(m: nn.Module) -> bool:
        return isinstance(m, _BatchNorm) and not isinstance(m, SplitBatchNorm)

    def make(bn: nn.Module) -> nn.Module:
        split = _rebuild(_split_class(bn), bn)
        split.aux_bn = nn.ModuleList([_rebuild(type(bn), bn, clone=True)])
        split.route = "clean"
        split.ghost_groups = 1
        return split

    # check every BN before replacing any, so nothing is half-converted
    for name, m in model.named_modules():
        if want(m) and m is not model:
            try:
                _split_class(m)
            except TypeError as e:
                raise TypeError(f"{name}: {e}") from None
    return _replace(model, want, make, "convert_split_bn_")


def revert_split_bn_(model: nn.Module) -> nn.Module:
    r"""Turns every :class:`SplitBatchNorm` of ``model`` back into the plain BatchNorm it was, keeping the main BN.

    .. math::
        \mathrm{BN}_{split} = (\mathrm{BN}_{main}, \mathrm{BN}_{aux}) \mapsto \mathrm{BN}_{main}

    The plain BN holds the main BN's very tensors; the auxiliary BN is dropped (AdvProp tests with the main BN).
    The state-dict keys are then exactly those of the model before :func:`convert_split_bn_`.

    Args:
        model: a module that contains split BatchNorms (not itself one).

    Returns:
        ``model``, reverted.

    Raises:
        TypeError: ``model`` is itself a split BatchNorm.

    Side effects:
        Replaces submodules of ``model``; the auxiliary parameters leave the model (and its ``parameters()``).

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> keys = list(model.state_dict())
        >>> model = revert_split_bn_(convert_split_bn_(model))
        >>> list(model.state_dict()) == keys, type(model[1]).__name__
        (True, 'BatchNorm1d')

    References:
        Xie et al., "Adversarial Examples Improve Image Recognition", arXiv 1911.09665.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    return _replace(
        model, lambda m: isinstance(m, SplitBatchNorm), lambda m: _rebuild(_plain_class(m), m), "revert_split_bn_"
    )


def _split_modules(model: nn.Module, caller: str) -> list[SplitBatchNorm]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    found = [m for m in model.modules() if isinstance(m, SplitBatchNorm)]
    if not found:
        raise ValueError(f"{caller}: {type(model).__name__} holds no split BatchNorm; call convert_split_bn_ first")
    return found


def _check_count(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return int(value)


@contextmanager
def bn_route(
    model: nn.Module, route: Route | None = None, *, split: tuple[int, int] | None = None
) -> Iterator[nn.Module]:
    r"""Selects which BatchNorm every :class:`SplitBatchNorm` of ``model`` uses, inside a ``with`` block.

    .. math::
        \texttt{"clean"}: \mathrm{BN}_{main}(x),\qquad \texttt{"adv"}: \mathrm{BN}_{aux}(x),\qquad
        (n_c, n_a): [\mathrm{BN}_{main}(x_{1:n_c});\ \mathrm{BN}_{aux}(x_{n_c+1:n_c+n_a})].

    The route holds in train and in eval mode (eval uses each BN's running statistics). The split route serves a
    batch ``[clean; noisy or adversarial]`` in one forward, each part normalized with its own statistics. On exit
    every module gets back the route it had, so blocks nest.

    Args:
        model: a module converted by :func:`convert_split_bn_` (a DDP wrapper of one works too).
        route: ``"clean"`` (main BN) or ``"adv"`` (auxiliary BN); give this or ``split``.
        split: ``(n_clean, n_aux)``, row counts ``>= 0``: the first ``n_clean`` rows use the main BN and the
            next ``n_aux`` rows the auxiliary BN; every batch in the block must have ``n_clean + n_aux`` rows.

    Returns:
        A context manager yielding ``model``.

    Raises:
        ValueError: both or neither of ``route`` and ``split``; an unknown route; negative counts, or both 0;
            a model without split BatchNorms. A forward in a split block raises ValueError when the batch has
            another size.
        TypeError: non-integer counts.

    Side effects:
        Sets the ``route`` attribute of the split BNs for the duration of the block.

    Example:
        >>> import torch
        >>> model = convert_split_bn_(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)))
        >>> with torch.no_grad():
        ...     _ = model[1].aux.bias.fill_(5.0)
        ...     _ = model.eval()
        ...     with bn_route(model, "adv"):
        ...         adv = model(torch.zeros(2, 3))
        ...     clean = model(torch.zeros(2, 3))
        >>> torch.allclose(adv - clean, torch.full((2, 2), 5.0))
        True

    References:
        Xie et al., "Adversarial Examples Improve Image Recognition", arXiv 1911.09665.
    """
    if (route is None) == (split is None):
        raise ValueError(
            f"give exactly one of route ('clean' or 'adv') and split=(n_clean, n_aux); "
            f"got route={route!r}, split={split!r}"
        )
    if route is not None:
        if route not in ("clean", "adv"):
            raise ValueError(f"route must be 'clean' or 'adv'; got {route!r}")
        value: Route | tuple[int, int] = route
    else:
        if not isinstance(split, tuple) or len(split) != 2:
            raise TypeError(f"split must be a pair (n_clean, n_aux); got {split!r}")
        value = (_check_count(split[0], "n_clean", 0), _check_count(split[1], "n_aux", 0))
        if value == (0, 0):
            raise ValueError("split=(0, 0) routes no row; give n_clean + n_aux > 0")
    with _set_on_split_bns(model, "bn_route", "route", value):
        yield model


@contextmanager
def ghost_bn(model: nn.Module, *, groups: int) -> Iterator[nn.Module]:
    r"""Normalizes each route's rows in ``groups`` consecutive groups (ghost BatchNorm), inside a ``with`` block.

    For a route's rows :math:`x_1, \dots, x_n` and :math:`m = n / G`, group :math:`g` is normalized with its own
    statistics, as it would be on its own device without SyncBatchNorm:

    .. math::
        y_i = \gamma \frac{x_i - \mu_g}{\sqrt{\sigma_g^2 + \epsilon}} + \beta,\quad
        \mu_g, \sigma^2_g = \text{mean, biased variance of } x_{gm+1}, \dots, x_{(g+1)m}
        \ \text{(per channel)}.

    In train mode the running statistics move once per forward, towards the mean over groups of
    :math:`\mu_g` and of the unbiased group variances, with the BN's momentum (cumulative average when it is
    ``None``). Eval mode with running statistics is unaffected. Use it to study in one process what per-device
    BatchNorm does across devices, e.g. with :func:`shuffle_permutation` (shuffle-BN).

    Args:
        model: a module converted by :func:`convert_split_bn_`.
        groups: :math:`G \ge 1`; every route's row count must be a multiple of it.

    Returns:
        A context manager yielding ``model``.

    Raises:
        TypeError: non-integer ``groups``.
        ValueError: ``groups < 1``, or a model without split BatchNorms. A forward raises ValueError when a route's
            rows do not divide into ``groups``, or when a SyncBatchNorm would synchronize across processes
            (ghost groups and cross-process statistics contradict each other).

    Side effects:
        Sets the ``ghost_groups`` attribute of the split BNs for the duration of the block.

    Example:
        >>> import torch
        >>> model = convert_split_bn_(torch.nn.Sequential(torch.nn.BatchNorm1d(3)))
        >>> x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
        >>> with ghost_bn(model, groups=2):
        ...     y = model(x)
        >>> reference = torch.nn.BatchNorm1d(3)
        >>> torch.allclose(y, torch.cat([reference(x[:4]), reference(x[4:])]), atol=1e-6)
        True

    References:
        Hoffer et al., "Train longer, generalize better" (ghost batch normalization), arXiv 1705.08741.
        Mei et al., "Fast AdvProp", arXiv 2204.09838.
    """
    groups = _check_count(groups, "groups", 1)
    with _set_on_split_bns(model, "ghost_bn", "ghost_groups", groups):
        yield model


@contextmanager
def _set_on_split_bns(model: nn.Module, caller: str, attr: str, value: Any) -> Iterator[None]:
    """Sets ``attr`` on every split BN of ``model`` for the block, then restores each module's own value."""
    modules = _split_modules(model, caller)
    saved = [(m, getattr(m, attr)) for m in modules]
    for m in modules:
        setattr(m, attr, value)
    try:
        yield
    finally:
        for m, v in saved:
            setattr(m, attr, v)


class SplitParameters(NamedTuple):
    """The parameters of a split-BN model by the samples that reach them."""

    shared: list[nn.Parameter]
    clean: list[nn.Parameter]
    aux: list[nn.Parameter]


def split_parameters(model: nn.Module) -> SplitParameters:
    r"""Sorts the parameters of a split-BN model into shared, clean-only (main BN) and adversarial-only (aux BN).

    .. math::
        \Theta = \Theta_{shared} \sqcup \Theta_{clean} \sqcup \Theta_{aux}

    Every sample reaches :math:`\Theta_{shared}`; only clean samples reach the main BNs' affine parameters and
    only noisy or adversarial samples the auxiliary BNs'. Use the groups for optimizer parameter groups or for
    :func:`advtrain.recycle.sync_update_speed_`.

    Args:
        model: any module; without split BNs everything is shared.

    Returns:
        ``SplitParameters(shared, clean, aux)``: lists in ``model.parameters()`` order, without duplicates.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.

    Example:
        >>> import torch
        >>> model = convert_split_bn_(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)))
        >>> [len(group) for group in split_parameters(model)]
        [2, 2, 2]

    References:
        Mei et al., "Fast AdvProp", arXiv 2204.09838 (synchronizing the parameter updating speed).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    clean, aux = set(), set()
    for m in model.modules():
        if isinstance(m, SplitBatchNorm):
            clean.update(id(p) for p in m.parameters(recurse=False))
            aux.update(id(p) for p in m.aux.parameters())
    out = SplitParameters([], [], [])
    for p in model.parameters():
        (out.clean if id(p) in clean else out.aux if id(p) in aux else out.shared).append(p)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Normalization of one route's rows, with optional ghost groups.


def _normalize(bn: _BatchNorm, forward: Callable[[Tensor], Tensor], x: Tensor, groups: int) -> Tensor:
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    if groups == 1 or not batch_stats:
        return forward(x)
    return _ghost_batch_norm(bn, x, groups)


def _ghost_batch_norm(bn: _BatchNorm, x: Tensor, groups: int) -> Tensor:
    bn._check_input_dim(x)
    if (
        isinstance(bn, nn.SyncBatchNorm)
        and bn.training
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size(bn.process_group or torch.distributed.group.WORLD) > 1
    ):
        raise ValueError(
            "ghost_bn groups > 1 would replace SyncBatchNorm's cross-process statistics with "
            "per-group ones; use shuffle_across_ranks for shuffle-BN across processes"
        )
    b, c = x.shape[0], x.shape[1]
    if b % groups:
        raise ValueError(f"ghost_bn: {b} rows (input shape {tuple(x.shape)}) do not divide into {groups} groups")
    m, rest = b // groups, x.shape[2:]
    # (G*m, C, *S) -> (m, G*C, *S): one F.batch_norm call normalizes every (group, channel) pair separately
    xs = x.reshape(groups, m, c, *rest).transpose(0, 1).reshape(m, groups * c, *rest)
    weight = bn.weight.repeat(groups) if bn.weight is not None else None
    bias = bn.bias.repeat(groups) if bn.bias is not None else None
    y = F.batch_norm(xs, None, None, weight, bias, True, 0.0, bn.eps)
    if bn.training and bn.track_running_stats:
        _update_running_stats(bn, x.detach(), groups)
    return y.reshape(m, groups, c, *rest).transpose(0, 1).reshape(x.shape)


@torch.no_grad()
def _update_running_stats(bn: _BatchNorm, x: Tensor, groups: int) -> None:
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    stats_dtype = bn.running_mean.dtype
    xg = x.reshape(groups, x.shape[0] // groups, x.shape[1], -1).to(stats_dtype)
    mean = xg.mean(dim=(1, 3)).mean(0)
    var = xg.var(dim=(1, 3), correction=1).mean(0)
    bn.running_mean.lerp_(mean, factor)
    bn.running_var.lerp_(var, factor)
