"""Decode encoded images at the size a transform needs: JPEGs are downscaled in the DCT domain while decoding.

A JPEG decoder can produce the image at ``M/8`` of its size (libjpeg's DCT scaling; Pillow's ``Image.draft`` offers
1/2, 1/4 and 1/8, simplejpeg every ``M/8``) for a fraction of the cost of a full decode followed by a resize. Doing
it without losing quality means never decoding smaller than what the next resize needs: ``decode_image`` takes the
smallest ``(width, height)`` the caller needs and picks the strongest reduction that keeps both sides at least that
large, so a later resize only ever shrinks.
"""

from __future__ import annotations

import functools
import io
import math
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

Decoder = Literal["auto", "pillow", "simplejpeg"]
Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]

_JPEG_MAGIC = b"\xff\xd8"


@functools.cache
def _simplejpeg():
    """The simplejpeg module (libjpeg-turbo, DCT-scaled decoding), or None when it is not installed."""
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def fast_decoder_available() -> bool:
    """Whether the optional faster JPEG decoder (simplejpeg, ``pip install advtrain[fast]``) is importable."""
    return _simplejpeg() is not None


def is_jpeg(data: bytes) -> bool:
    """Whether ``data`` starts with the JPEG start-of-image marker."""
    return data[:2] == _JPEG_MAGIC


def image_size(data: bytes) -> tuple[int, int]:
    """The ``(width, height)`` of an encoded image, read from its header without decoding pixels.

    Raises:
        PIL.UnidentifiedImageError: ``data`` is not an image Pillow can identify.
    """
    with Image.open(io.BytesIO(data)) as img:
        return img.size


def decode_image(data: bytes, *, min_size: tuple[int, int] | None = None, decoder: Decoder = "auto") -> Image.Image:
    """Decodes an encoded image to RGB, downscaling a JPEG in the DCT domain as far as ``min_size`` allows.

    For a JPEG of size ``(W, H)`` and ``min_size = (w, h)``, the decoder produces the image at the smallest scale
    ``M/8`` (Pillow: ``M`` in {1, 2, 4, 8}; simplejpeg: any ``M`` in 1..8) with ``ceil(W M / 8) >= w`` and
    ``ceil(H M / 8) >= h``; ``min_size`` larger than the image decodes at full size. Other formats (PNG, WebP,
    ...) always decode at full size. Greyscale, palette and CMYK images come back as RGB.

    Args:
        data: the encoded bytes (JPEG, PNG, WebP, or anything Pillow reads).
        min_size: ``(width, height)`` in pixels that each side of the result must reach; None: full size.
        decoder: ``"pillow"`` (always available), ``"simplejpeg"`` (the ``fast`` extra; raises if absent) or
            ``"auto"`` (simplejpeg for JPEGs when installed, Pillow otherwise and as the fallback for JPEGs that
            simplejpeg refuses, e.g. CMYK).

    Returns:
        An RGB ``PIL.Image.Image`` whose sides are ``>= min(min_size, original size)``.

    Raises:
        PIL.UnidentifiedImageError, OSError, ValueError: the bytes are not a decodable image (Pillow's errors:
            unknown format, truncated data).
        ValueError: ``min_size`` is not two positive ints, or an unknown ``decoder``.
        ImportError: ``decoder="simplejpeg"`` without simplejpeg installed.

    Example:
        >>> buf = io.BytesIO(); Image.new("RGB", (500, 375), (200, 30, 30)).save(buf, "JPEG")
        >>> decode_image(buf.getvalue(), min_size=(120, 90), decoder="pillow").size
        (125, 94)
    """
    if min_size is not None and (len(min_size) != 2 or min(min_size) < 1):
        raise ValueError(f"min_size must be (width, height) with both >= 1; got {min_size}")
    match decoder:
        case "auto":
            sj = _simplejpeg() if is_jpeg(data) else None
        case "simplejpeg":
            sj = _simplejpeg()
            if sj is None:
                raise ImportError("decoder='simplejpeg' needs simplejpeg: pip install 'advtrain[fast]'")
        case "pillow":
            sj = None
        case _:
            raise ValueError(f"decoder must be 'auto', 'pillow' or 'simplejpeg'; got {decoder!r}")
    if sj is not None and is_jpeg(data):
        try:
            return _decode_simplejpeg(sj, data, min_size)
        except ValueError:
            if decoder == "simplejpeg":
                raise
            # CMYK / YCCK JPEGs and some damaged files: Pillow decodes what libjpeg-turbo's fast path refuses
    return _decode_pillow(data, min_size)


def _decode_pillow(data: bytes, min_size: tuple[int, int] | None) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    if min_size is not None and img.format == "JPEG":
        # draft keeps the largest 1/s (s in 8, 4, 2, 1) with W // w >= s and H // h >= s, so W / s >= w, H / s >= h
        img.draft("RGB", (min(min_size[0], img.width), min(min_size[1], img.height)))
    return img.convert("RGB") if img.mode != "RGB" else _loaded(img)


def _loaded(img: Image.Image) -> Image.Image:
    img.load()
    return img


def _decode_simplejpeg(sj, data: bytes, min_size: tuple[int, int] | None) -> Image.Image:
    w, h = (0, 0) if min_size is None else min_size
    if min_size is not None:
        # simplejpeg's guarantee is on the rounded-up output size, ceil(W M / 8) >= w; one pixel more makes the
        # unrounded W M / 8 exceed w, so that a box scaled by M / 8 keeps its full pixel count
        width, height, _, _ = sj.decode_jpeg_header(data)
        w, h = min(w + 1, width), min(h + 1, height)
    arr = sj.decode_jpeg(data, colorspace="RGB", min_width=w, min_height=h)
    return Image.fromarray(arr, "RGB")


def dct_scale(original: tuple[int, int], decoded: tuple[int, int]) -> float:
    """The scale a JPEG decoder applied: the ``M/8`` with ``ceil(side M / 8)`` equal to both decoded sides.

    Used to map a box given in original pixel coordinates onto a drafted image. Falls back to
    ``decoded_width / original_width`` when no ``M/8`` matches (a decoder that resized some other way).

    Example:
        >>> dct_scale((500, 375), (125, 94))
        0.25
    """
    (W, H), (w, h) = original, decoded
    for m in range(1, 9):
        if -(-W * m // 8) == w and -(-H * m // 8) == h:
            return m / 8
    return w / W


def pil_resample(interpolation: Interpolation) -> Image.Resampling:
    """The Pillow resampling filter for an interpolation name (timm's and torchvision's names)."""
    match interpolation:
        case "nearest":
            return Image.Resampling.NEAREST
        case "bilinear":
            return Image.Resampling.BILINEAR
        case "bicubic":
            return Image.Resampling.BICUBIC
        case "lanczos":
            return Image.Resampling.LANCZOS
        case "box":
            return Image.Resampling.BOX
        case "hamming":
            return Image.Resampling.HAMMING
        case _:
            raise ValueError(
                f"interpolation must be nearest, bilinear, bicubic, lanczos, box or hamming; got {interpolation!r}"
            )


def to_pil(image: Tensor | np.ndarray | Image.Image) -> Image.Image:
    """An RGB PIL image from a uint8 ``(C, H, W)`` tensor (C = 1 or 3), an ``(H, W[, C])`` array, or a PIL image."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(
                f"expected a uint8 (C, H, W) tensor with C in (1, 3); got {image.dtype} {tuple(image.shape)}"
            )
        image = image.permute(1, 2, 0).numpy()
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels; got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")


def pil_to_uint8(img: Image.Image) -> Tensor:
    """A uint8 ``(3, H, W)`` tensor from an RGB PIL image."""
    arr = np.asarray(img.convert("RGB") if img.mode != "RGB" else img)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def ceil_int(x: float) -> int:
    """``ceil`` with a small tolerance, so that 112.00000000001 (float noise) counts as 112."""
    return math.ceil(x - 1e-9)
