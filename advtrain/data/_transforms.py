"""The standard ImageNet transforms, decode-aware: RandomResizedCrop on the original image, resize + center crop.

Training (Szegedy et al. 2015, as timm and torchvision do it): sample a box covering a fraction
``s ~ U(scale)`` of the original image's area with aspect ``r ~ logU(ratio)``, resize that box to ``size x size``,
flip horizontally with probability ``hflip``, then RandAugment. Validation (timm's ``crop_pct`` convention):
resize the shorter side to ``floor(size / crop_pct)`` keeping the aspect, then take the center ``size x size``
crop (224 / 0.875 = 256). Nothing squashes an image to a square first.

Both transforms accept the encoded bytes: the crop box (or the resize target) is computed from the header's
dimensions before decoding, so the JPEG is decoded at the smallest DCT scale that still gives the box at least
``size`` pixels on each side (see :func:`advtrain.data.decode_image`). The crop is never upsampled because of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from advtrain.data._decode import (
    Decoder,
    Interpolation,
    ceil_int,
    dct_scale,
    decode_image,
    image_size,
    pil_resample,
    pil_to_uint8,
    to_pil,
)

ImageInput = bytes | Image.Image | Tensor

# timm's defaults: ImageNet mean as 0-255 fill colour for RandAugment's geometric ops
_IMAGENET_MEAN_255 = (124, 116, 104)


def sample_crop_box(
    width: int, height: int, *, scale: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box on a ``width x height`` image, drawn from ``generator``: ``(left, top, w, h)``.

    The Inception crop as torchvision samples it: up to 10 tries of an area ``A s`` with ``s ~ U(scale)`` and an
    aspect ``r = exp(u)``, ``u ~ U(log ratio)``, giving ``w = round(sqrt(A s r))``, ``h = round(sqrt(A s / r))``;
    the first box that fits is placed uniformly; if none fits, the whole image with its aspect clamped to
    ``ratio``, centered. The draws are torchvision's (``RandomResizedCrop.get_params``), in the same order, from
    ``generator`` instead of torch's global RNG: with a generator seeded like the global one, the boxes agree
    (tested), and nothing global is touched (and no ~200 us global reseed per image).

    Args:
        width, height: the original image's size in pixels.
        scale: ``(lo, hi)`` fractions of the area, ``0 < lo <= hi <= 1``.
        ratio: ``(lo, hi)`` aspect ratios (w / h), ``0 < lo <= hi``.
        generator: the sample's generator.

    Returns:
        ``(left, top, box_width, box_height)`` in pixels, inside the image.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> sample_crop_box(500, 375, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), generator=g)
        (0, 0, 500, 375)
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    draw = torch.empty(1)
    for _ in range(10):
        s = float(draw.uniform_(scale[0], scale[1], generator=generator))
        r = math.exp(float(draw.uniform_(log_lo, log_hi, generator=generator)))
        w, h = round(math.sqrt(area * s * r)), round(math.sqrt(area * s / r))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return left, top, w, h
    aspect = width / height  # no try fitted: the largest centered box with a permitted aspect
    w, h = width, height
    if aspect < ratio[0]:
        h = round(width / ratio[0])
    elif aspect > ratio[1]:
        w = round(height * ratio[1])
    return (width - w) // 2, (height - h) // 2, w, h


def rand_augment(config: str, *, size: int, interpolation: Interpolation = "bicubic") -> Callable:
    """timm's RandAugment for ``size``-pixel images (``rand_augment_transform`` with timm's ImageNet hparams).

    ``magnitude_max`` is 9: with ``inc1`` ops a magnitude of 10 asks Pillow to posterize to 0 bits, which
    Pillow >= 11 refuses.

    Args:
        config: a timm RandAugment string, e.g. ``"rand-m9-mstd0.5-inc1"`` (DeiT / AdvXL).
        size: the image side the ops are applied at (sets ``translate_const = 0.45 size``).
        interpolation: the resampling filter of the geometric ops.
    """
    from timm.data import rand_augment_transform

    hparams = {
        "translate_const": int(size * 0.45),
        "img_mean": _IMAGENET_MEAN_255,
        "magnitude_max": 9,
        "interpolation": pil_resample(interpolation),
    }
    return rand_augment_transform(config, hparams)


@contextlib.contextmanager
def _host_rng(seed: int):
    """Seeds Python's and NumPy's global RNGs (timm's RandAugment draws from both) for the block.

    In the main process their states are restored afterwards; a DataLoader worker's are its own (nothing else in
    the worker draws from them between samples), so there they are only reseeded, which saves ~100 us per image.
    """
    from torch.utils.data import get_worker_info

    restore = get_worker_info() is None
    if restore:
        py, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        if restore:
            random.setstate(py)
            np.random.set_state(np_state)


def train_transform(
    *,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    randaugment: str | None = None,
    interpolation: Interpolation = "bicubic",
    decoder: Decoder = "auto",
    erase: float = 0.0,
) -> TrainTransform:
    """The ImageNet training transform: RandomResizedCrop of the original image, flip, RandAugment; uint8 out.

    The returned callable takes the encoded bytes (or a PIL image, or a uint8 ``(C, H, W)`` tensor) and the
    sample's ``torch.Generator``, and is a pure function of the two. With bytes, the crop box ``(l, t, w, h)`` is
    drawn on the header's ``(W, H)`` and the JPEG is decoded with ``min_size = (ceil(W k), ceil(H k))``,
    ``k = size / min(w, h)``, so the box still spans ``>= size`` pixels per side on the drafted image; the box is
    then mapped by the decoder's scale and resized to ``size x size`` in one Pillow ``resize(box=...)``.

    Args:
        size: output side in pixels (112 for AdvXL stage 1, 224 for stage 2).
        scale: RandomResizedCrop area fractions; timm's default ``(0.08, 1.0)``; ``(1, 1)`` with ``ratio`` equal
            to the image's aspect keeps the whole image.
        ratio: RandomResizedCrop aspect ratios (w / h); timm's default ``(3/4, 4/3)``.
        hflip: probability of a horizontal flip, in [0, 1].
        randaugment: a timm RandAugment string (``"rand-m9-mstd0.5-inc1"``) or None (off).
        interpolation: the resampling filter of the crop resize (and of RandAugment's geometric ops).
        decoder: see :func:`advtrain.data.decode_image`. ``"auto"`` uses simplejpeg where it is installed; the
            two decoders' pixels differ slightly, so an exact resume needs the same install.
        erase: random-erasing probability (:func:`random_erase`, last, on the uint8 output); 0 is off.

    Returns:
        ``transform(image, generator) -> Tensor`` of shape ``(3, size, size)``, dtype uint8.

    Raises:
        ValueError: ``size < 1``, ``scale`` / ``ratio`` not increasing positive pairs (scale within (0, 1]),
            ``hflip`` outside [0, 1], or an unknown interpolation.

    Example:
        >>> t = train_transform(size=32)
        >>> t(Image.new("RGB", (64, 48)), torch.Generator().manual_seed(0)).shape
        torch.Size([3, 32, 32])

    References:
        Szegedy et al., Going deeper with convolutions (arXiv 1409.4842); Cubuk et al., RandAugment
        (arXiv 1909.13719).
    """
    _check_size(size)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi <= 1; got {scale}")
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must be (lo, hi) with 0 < lo <= hi; got {ratio}")
    if not 0 <= hflip <= 1:
        raise ValueError(f"hflip must be a probability in [0, 1]; got {hflip}")
    if not 0 <= erase <= 1:
        raise ValueError(f"erase must be a probability in [0, 1]; got {erase}")
    ra = rand_augment(randaugment, size=size, interpolation=interpolation) if randaugment else None
    return TrainTransform(
        size=size,
        scale=tuple(scale),
        ratio=tuple(ratio),
        hflip=hflip,
        resample=pil_resample(interpolation),
        rand_augment=ra,
        decoder=decoder,
        erase=erase,
    )


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """The callable :func:`train_transform` returns (a class, not a closure: worker processes pickle it)."""

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    hflip: float
    resample: Image.Resampling
    rand_augment: Callable | None
    decoder: Decoder
    erase: float = 0.0  # random-erasing probability

    def __call__(self, image: ImageInput, generator: torch.Generator) -> Tensor:
        img, box = crop_source(
            image, size=self.size, scale=self.scale, ratio=self.ratio, generator=generator, decoder=self.decoder
        )
        out = img.resize((self.size, self.size), self.resample, box=box)
        if bool(torch.rand(1, generator=generator) < self.hflip):
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.rand_augment is not None:
            with _host_rng(int(torch.randint(0, 2**62, (1,), generator=generator))):
                out = self.rand_augment(out)
        if self.erase:
            return random_erase(pil_to_uint8(out), p=self.erase, generator=generator)
        return pil_to_uint8(out)


def crop_source(
    image: ImageInput,
    *,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
    decoder: Decoder = "auto",
) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """Draws the RandomResizedCrop box and decodes just enough of the image for it.

    Returns:
        ``(image, box)``: the (possibly DCT-downscaled) RGB image and the crop box on it as Pillow's
        ``(x0, y0, x1, y1)`` floats; ``box`` spans at least ``size`` pixels on each side unless the original box
        itself is smaller.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        W, H = image_size(data)
        left, top, w, h = sample_crop_box(W, H, scale=scale, ratio=ratio, generator=generator)
        k = size / min(w, h)
        img = (
            decode_image(data, min_size=(ceil_int(W * k), ceil_int(H * k)), decoder=decoder)
            if k < 1
            else (decode_image(data, decoder=decoder))
        )
    else:
        img = to_pil(image)
        W, H = img.size
        left, top, w, h = sample_crop_box(W, H, scale=scale, ratio=ratio, generator=generator)
    s = dct_scale((W, H), img.size) if img.size != (W, H) else 1.0
    return img, (left * s, top * s, (left + w) * s, (top + h) * s)


def random_erase(
    image: Tensor,
    *,
    p: float,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.02, 1 / 3),
    ratio: tuple[float, float] = (0.3, 3.3),
) -> Tensor:
    r"""Random erasing (Zhong et al.): with probability ``p``, one box of the image is replaced by uniform noise.

    The box covers a fraction :math:`s \sim U(\text{scale})` of the area with aspect
    :math:`r = e^u,\ u \sim U(\log \text{ratio})` (up to 10 tries; none fitting: the image is returned
    unchanged), placed uniformly; every pixel of every channel in it is drawn independently, uniform over the
    image's range: :math:`U[0, 1]` for float images, uniform integers in ``[0, 255]`` for uint8 ones. So the
    output stays a valid image in [0, 1] (pixel space, before normalization), unlike timm's ``RandomErasing``
    ``mode="pixel"``, which fills with standard normal noise in normalized space (per channel roughly
    :math:`\mathcal{N}(\mu, \sigma^2)` in pixels, unclipped); DeiT / MAE / Singh et al. use timm's with
    ``p=0.25``. Both replace the box's content with per-pixel noise of about the same spread; ours never
    leaves [0, 1], which the recipes' attacks and eps require.

    Args:
        image: ``(C, H, W)``, uint8 or floating in [0, 1].
        p: the probability of erasing, in [0, 1].
        generator: the sample's generator (every draw comes from it).
        scale: ``(lo, hi)`` area fractions, ``0 < lo <= hi <= 1``.
        ratio: ``(lo, hi)`` aspect ratios, ``0 < lo <= hi``.

    Returns:
        A new tensor of the same shape and dtype (``image`` itself when nothing was erased).

    Raises:
        ValueError: an image that is not ``(C, H, W)``, or ``p`` outside [0, 1].

    Example:
        >>> x = torch.zeros(3, 32, 32)
        >>> y = random_erase(x, p=1.0, generator=torch.Generator().manual_seed(0))
        >>> bool((y > 0).any()), bool(y.max() <= 1)
        (True, True)

    References:
        Zhong et al., Random Erasing Data Augmentation (arXiv 1708.04896).
    """
    if image.dim() != 3:
        raise ValueError(f"random_erase needs a (C, H, W) image; got shape {tuple(image.shape)}")
    if not 0 <= p <= 1:
        raise ValueError(f"random_erase: p must be in [0, 1]; got {p}")
    if p == 0 or float(torch.rand(1, generator=generator)) >= p:
        return image
    c, h, w = image.shape
    area, draw = h * w, torch.empty(1)
    for _ in range(10):
        s = float(draw.uniform_(scale[0], scale[1], generator=generator))
        r = math.exp(float(draw.uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)))
        bh, bw = round(math.sqrt(area * s / r)), round(math.sqrt(area * s * r))
        if 0 < bh < h and 0 < bw < w:
            top = int(torch.randint(0, h - bh + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - bw + 1, (1,), generator=generator))
            if image.dtype == torch.uint8:
                noise = torch.randint(0, 256, (c, bh, bw), generator=generator, dtype=torch.uint8)
            else:
                noise = torch.rand((c, bh, bw), generator=generator, dtype=image.dtype)
            out = image.clone()
            out[:, top : top + bh, left : left + bw] = noise
            return out
    return image


def resize_dims(width: int, height: int, shorter: int) -> tuple[int, int]:
    """``(w, h)`` with the shorter side ``shorter`` and the aspect kept (torchvision's ``Resize(int)`` rounding).

    Example:
        >>> resize_dims(500, 375, 256)
        (341, 256)
    """
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def val_transform(
    *, size: int, crop_pct: float = 0.875, interpolation: Interpolation = "bicubic", decoder: Decoder = "auto"
) -> ValTransform:
    """The ImageNet evaluation transform: shorter side to ``floor(size / crop_pct)``, center ``size`` crop; uint8.

    Matches timm's eval transform (``Resize(floor(size / crop_pct))`` + ``CenterCrop(size)``) pixel for pixel on
    a PIL image. Given encoded JPEG bytes, the image is first decoded at the smallest DCT scale that still covers
    the resize target, then resized to it. A square image already at ``size`` with ``crop_pct = 1`` is returned
    unchanged (in-memory sets like MNIST or CIFAR-10).

    Args:
        size: output side in pixels.
        crop_pct: the crop's fraction of the resized shorter side, in (0, 1]; timm's default 0.875 (224 <- 256).
        interpolation: the resampling filter of the resize.
        decoder: see :func:`advtrain.data.decode_image`.

    Returns:
        ``transform(image) -> Tensor`` of shape ``(3, size, size)``, dtype uint8, for bytes, a PIL image or a
        uint8 ``(C, H, W)`` tensor.

    Raises:
        ValueError: ``size < 1``, ``crop_pct`` outside (0, 1], or an unknown interpolation.

    Example:
        >>> val_transform(size=224)(Image.new("RGB", (500, 375))).shape
        torch.Size([3, 224, 224])
    """
    _check_size(size)
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1]; got {crop_pct}")
    return ValTransform(
        size=size, shorter=math.floor(size / crop_pct + 1e-9), resample=pil_resample(interpolation), decoder=decoder
    )


@dataclasses.dataclass(frozen=True)
class ValTransform:
    """The callable :func:`val_transform` returns; ``generator`` is accepted (and ignored) so that sources can
    call every transform as ``transform(image, generator)``."""

    size: int
    shorter: int
    resample: Image.Resampling
    decoder: Decoder

    def __call__(self, image: ImageInput, generator: torch.Generator | None = None) -> Tensor:
        if isinstance(image, (bytes, bytearray, memoryview)):
            data = bytes(image)
            target = resize_dims(*image_size(data), self.shorter)
            img = decode_image(data, min_size=target, decoder=self.decoder)
        else:
            img = to_pil(image)
            target = resize_dims(*img.size, self.shorter)
        if img.size != target:
            img = img.resize(target, self.resample)
        left, top = round((target[0] - self.size) / 2.0), round((target[1] - self.size) / 2.0)
        return pil_to_uint8(img.crop((left, top, left + self.size, top + self.size)))


def _check_size(size: int) -> None:
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int; got {size!r}")
