"""Common-corruption error (ImageNet-C style): top-1 error under each (corruption, severity), seeded per image."""

from __future__ import annotations

import inspect

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from advtrain.eval._robust import eval_mode
from advtrain.training._rng import seeded_host_rng, stable_seed


class CorruptedImages(Dataset):
    """Every (corruption, severity, image) of a list of uint8 ``(3, H, W)`` images, corrupted on the fly.

    The corruptions come from the ``imagecorruptions`` library (Michaelis et al., arXiv 1907.07484: Hendrycks &
    Dietterich's ImageNet-C code, arXiv 1903.12261), on ``(H, W, 3)`` uint8 images of at least 32 px. Their
    randomness (NumPy's global RNG, or a ``seed`` argument) is seeded by (seed, corruption, severity, image), so
    the corrupted images are the same in every process and every run. Items are ``(image, label, pair)`` with
    ``pair`` indexing ``pairs``.
    """

    def __init__(self, images: list[Tensor], labels: list[int], pairs: list[tuple[str, int]], *, seed: int):
        self.images, self.labels, self.pairs, self.seed = images, labels, pairs, seed

    def __len__(self) -> int:
        return len(self.pairs) * len(self.images)

    def __getitem__(self, k: int):
        from imagecorruptions import corrupt, corruption_dict

        p, i = divmod(k, len(self.images))
        name, severity = self.pairs[p]
        s = stable_seed(self.seed, name, severity, i)
        kwargs = {"seed": s} if "seed" in inspect.signature(corruption_dict[name]).parameters else {}
        with seeded_host_rng(s):
            img = corrupt(self.images[i].permute(1, 2, 0).numpy(), corruption_name=name, severity=severity, **kwargs)
        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous(), self.labels[i], p


def corruption_errors(
    model: nn.Module,
    images: list[Tensor],
    labels: list[int],
    *,
    corruptions: tuple[str, ...],
    severities: tuple[int, ...],
    seed: int,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict:
    r"""Top-1 error under every (corruption, severity), and their mean (the unnormalized mCE, in [0, 1]).

    .. math:: \mathrm{CE} = \frac{1}{|C|\,|S|} \sum_{c \in C} \sum_{s \in S} \mathrm{err}_{c,s}

    ImageNet-C's mCE divides each type's error by AlexNet's; that needs AlexNet's errors on the same images, so
    this is the plain mean error, as the Fast AdvProp code's ``CE (unnormalized)``. The model runs in eval mode
    (restored after) without gradients; the caller chooses autocast.

    Args:
        model: images in [0, 1] ``(B, 3, H, W)`` -> logits.
        images: uint8 ``(3, H, W)`` images, H, W >= 32.
        labels: their int labels.
        corruptions: imagecorruptions names.
        severities: a subset of 1..5.
        seed: seeds every image's corruption.
        batch_size, num_workers: of the corrupting loader.
        device: where the model runs.
        progress: a tqdm bar.

    Returns:
        ``{"corruption_error": mean, "corruption_errors": {name: [error per severity]}, "corruption_n": n}``.
    """
    from tqdm.auto import tqdm

    pairs = [(name, s) for name in corruptions for s in severities]
    loader = DataLoader(
        CorruptedImages(images, labels, pairs, seed=seed), batch_size=batch_size, num_workers=num_workers, shuffle=False
    )
    correct = torch.zeros(len(pairs), dtype=torch.int64)
    with eval_mode(model), torch.no_grad():
        for x, y, p in tqdm(loader, desc="corruptions", unit="batch", dynamic_ncols=True, disable=not progress):
            ok = model(x.to(device).float().div_(255)).argmax(1).cpu() == y
            correct += torch.bincount(p[ok], minlength=len(pairs))
    err = (1 - correct.double() / len(images)).view(len(corruptions), len(severities))
    return {
        "corruption_error": float(err.mean()),
        "corruption_n": len(images),
        "corruption_errors": {name: err[i].tolist() for i, name in enumerate(corruptions)},
    }
