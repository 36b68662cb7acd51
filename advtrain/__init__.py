"""advtrain: composable, functional adversarial-training primitives for PyTorch.

>>> from advtrain import pgd, fgsm
"""

from advtrain.attacks import fgsm, pgd, project
from advtrain.losses import cross_entropy

__version__ = "0.1.0"

__all__ = ["cross_entropy", "fgsm", "pgd", "project"]
