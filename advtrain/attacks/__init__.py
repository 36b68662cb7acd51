"""Attacks: PGD, Auto-PGD and FGSM under l_inf, l_2 and l_1, with exact projections onto the eps-ball and the pixel box.

Every attack follows one contract: a detached result of ``x``'s shape, dtype and device, finite and inside the ball
and the box, also when the model's outputs are NaN/inf (a sample whose loss or gradient is not finite does not step
from that iterate; a :class:`NonFiniteWarning` counts them); the model's mode, parameters, buffers and ``.grad``
left as found; input gradients via ``torch.autograd.grad``; randomness only from ``generator=``.

To compile an attack, compile :func:`detach_params` of the model rather than the model itself: the compiled
backward of a model whose parameters require gradients computes every weight gradient even when only the input's
is asked for.
"""

from advtrain.attacks._apgd import apgd
from advtrain.attacks._detached import DetachedParams, detach_params
from advtrain.attacks._guard import NonFiniteWarning
from advtrain.attacks._pgd import fgsm, pgd, random_in_ball
from advtrain.attacks._project import project
from advtrain.attacks._projections import Norm
from advtrain.attacks._targets import random_targets

__all__ = [
    "DetachedParams",
    "NonFiniteWarning",
    "Norm",
    "apgd",
    "detach_params",
    "fgsm",
    "pgd",
    "project",
    "random_in_ball",
    "random_targets",
]
