"""A view of a model whose forward uses detached parameters, so that a compiled attack computes only input gradients."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class DetachedParams(nn.Module):
    r"""Runs ``module`` with detached copies of its parameters: gradients reach the input only.

    .. math::
        f_{\bar\theta}(x) = f(x;\ \mathrm{stopgrad}(\theta)), \qquad
        \nabla_x f_{\bar\theta}(x) = \nabla_x f(x; \theta), \qquad \nabla_\theta f_{\bar\theta} = 0.

    Why it exists: ``torch.compile`` traces a model's backward once, for every graph input that requires a
    gradient, parameters included. ``torch.autograd.grad(loss, x)`` then selects the input gradient from a compiled
    backward that has already computed all weight gradients too, so a compiled attack step costs as much as a
    training step instead of ~2/3 of it. Through this view the parameters enter the graph detached, the traced
    backward has one output (the input gradient), and eager autograd, which prunes by itself, is unchanged.

    Same outputs, same input gradients and the same buffers as ``module`` (BatchNorm running statistics are the
    module's own tensors, updated in place in train mode, as the attacks' contract then restores). The view
    holds ``module`` as its only child, so mode switches, ``state_dict`` and ``.to()`` reach it, and it adds no
    parameters or buffers of its own. Keyword arguments of the forward pass through (``indices=`` of a
    reduced-token ViT).

    Args:
        module: the model to view; it is not copied.

    Example:
        >>> import torch
        >>> from advtrain import pgd
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
        >>> g = lambda: torch.Generator().manual_seed(0)
        >>> a = pgd(DetachedParams(model), x, y, eps=4 / 255, step_size=1 / 255, steps=2, generator=g())
        >>> torch.equal(a, pgd(model, x, y, eps=4 / 255, step_size=1 / 255, steps=2, generator=g()))
        True

    References:
        PyTorch, ``torch.func.functional_call``.
    """

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"DetachedParams views an nn.Module; got {type(module).__name__}")
        super().__init__()
        self.module = module

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        params = {name: p.detach() for name, p in self.module.named_parameters()}
        return torch.func.functional_call(self.module, params, (x, *args), kwargs, strict=False)


def detach_params(module: nn.Module) -> DetachedParams:
    """``DetachedParams(module)``: compile this view, not the training model, for attacks.

    Example:
        >>> import torch
        >>> attack_model = torch.compile(detach_params(torch.nn.Linear(4, 2)))  # doctest: +SKIP
    """
    return DetachedParams(module)
