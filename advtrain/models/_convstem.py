"""ConvStem: a stack of stride-2 3x3 convolutions in place of a ViT's or ConvNeXt's patchify stem."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, Literal

from torch import Tensor, nn

StemNorm = Literal["layer", "batch"]
StemAct = Literal["gelu", "relu"]


class ConvStem(nn.Module):
    r"""Overlapping 3x3 convolutions (conv, norm, activation) with total stride ``stride``, then a 1x1 projection.

    With channels :math:`c_1, \dots, c_k` and :math:`s = 2^m`, layer :math:`i` is
    :math:`z_i = \mathrm{act}(\mathrm{norm}(\mathrm{conv}^{3\times3}_{\sigma_i}(z_{i-1})))` with
    :math:`c_i` output channels, padding 1 and stride :math:`\sigma_i = 2` for :math:`i \le m`, 1 after; with
    ``project=True`` a final :math:`1\times1` convolution (no norm, no activation) maps :math:`c_k` to
    ``out_chans``. An ``(H, W)`` input whose sides are multiples of ``s`` comes out ``(H / s, W / s)``: the
    token grid of a :math:`s \times s` patchify convolution (other sides give :math:`\lceil H / s \rceil`
    where the patch stem gives :math:`\lfloor H / s \rfloor`).

    Singh et al.'s ViT-S/16 stem is ``ConvStem(3, 384, channels=(48, 96, 192, 384), stride=16)``, their
    ConvNeXt-T stem ``ConvStem(3, 96, channels=(48, 96), stride=4, project=False)``, their ConvNeXt-B stem
    ``channels=(64, 96, 128)`` (the third convolution at stride 1). The layers live in ``self.stem``
    (an ``nn.Sequential``), so ``state_dict`` keys are those of the authors' released checkpoints
    (``stem.0.weight``, ``stem.1.weight``, ...; the final 1x1 is ``stem.{3k}``). Convolutions have biases, as
    theirs; initialization is PyTorch's default.

    ``norm="layer"`` is a channels-first LayerNorm (timm's ``LayerNorm2d``, eps 1e-6): per-sample, so the
    stem behaves the same in train and eval mode and an attack's batch cannot move it. ``norm="batch"``
    (Xiao et al.'s choice, with ReLU) adds the only BatchNorm to a ViT: adversarial and clean batches then
    share running statistics (see :mod:`advtrain.bn`).

    Args:
        in_chans: input channels (3 for RGB).
        out_chans: output channels: a ViT's ``embed_dim`` or a ConvNeXt's ``dims[0]``.
        channels: output channels :math:`c_1, \dots, c_k` of the 3x3 convolutions, :math:`k \ge \log_2 s`;
            each ``>= 1``. With ``project=False``, ``channels[-1]`` must equal ``out_chans``.
        stride: total stride :math:`s`, a power of two ``>= 2`` (the patch size it replaces).
        norm: ``"layer"`` (LayerNorm over channels) or ``"batch"`` (``nn.BatchNorm2d``).
        act: ``"gelu"`` (exact, erf) or ``"relu"``.
        project: end with the 1x1 projection to ``out_chans``; ``False`` ends on the last conv-norm-act.

    Raises:
        TypeError: a non-int count or channel.
        ValueError: a count below 1, a stride that is not a power of two ``>= 2``, fewer than
            :math:`\log_2 s` channels, ``channels[-1] != out_chans`` without projection, an unknown ``norm`` or
            ``act``; in ``forward``, an input that is not ``(B, in_chans, H, W)``.

    Example:
        >>> import torch
        >>> stem = ConvStem(3, 64, channels=(8, 16), stride=4)
        >>> stem(torch.rand(2, 3, 32, 48)).shape
        torch.Size([2, 64, 8, 12])

    References:
        Singh, Croce & Hein, "Revisiting Adversarial Training for ImageNet: Architectures, Training and
        Generalization across Threat Models" (ConvStem), NeurIPS 2023, arXiv 2303.01870.
        Xiao et al., "Early Convolutions Help Transformers See Better", arXiv 2106.14881.
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        *,
        channels: Sequence[int],
        stride: int,
        norm: StemNorm = "layer",
        act: StemAct = "gelu",
        project: bool = True,
    ):
        super().__init__()
        self.in_chans = _check_count(in_chans, "in_chans")
        self.out_chans = _check_count(out_chans, "out_chans")
        m = _log2_stride(stride)
        self.stride = int(stride)
        chans = _check_channels(channels, m)
        if not project and chans[-1] != out_chans:
            raise ValueError(f"without project, channels[-1] must equal out_chans={out_chans}; got channels={chans}")
        strides = [2] * m + [1] * (len(chans) - m)
        layers: list[nn.Module] = []
        for c_in, c_out, s in zip((self.in_chans, *chans), chans, strides):
            layers += [nn.Conv2d(c_in, c_out, kernel_size=3, stride=s, padding=1), _norm(norm, c_out), _act(act)]
        if project:
            layers.append(nn.Conv2d(chans[-1], out_chans, kernel_size=1))
        self.stem = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"ConvStem expects (B, {self.in_chans}, H, W) input; got shape {tuple(x.shape)}")
        return self.stem(x)


def convstem_(
    model: nn.Module, *, channels: Sequence[int] | None = None, norm: StemNorm = "layer", act: StemAct = "gelu"
) -> nn.Module:
    r"""Replaces a timm ViT's or ConvNeXt's patchify stem with a :class:`ConvStem` of the same stride, in place.

    A ``VisionTransformer`` with patch size :math:`p = 2^m` gets ``patch_embed.proj = ConvStem(C, D,
    channels, stride=p)``, ending in a 1x1 projection to ``embed_dim`` :math:`D`; the ``patch_embed`` module
    itself stays, so ``dynamic_img_size``, ``dynamic_img_pad``, the grid size, flattening, its norm and
    :func:`advtrain.tokens.resample_vit_` keep working, and the token grid is unchanged: :math:`(H/p)(W/p)`
    tokens of width :math:`D`. Default channels :math:`48 \cdot 2^i, i < m` (``(48, 96, 192, 384)`` for
    :math:`p = 16`): the authors' stem for ViT-S, ViT-M and ViT-B alike.

    A ``ConvNeXt`` gets ``stem = ConvStem(C, d_0, channels, stride=s, project=False)`` in place of its whole
    stem (the :math:`s \times s` patchify convolution and its LayerNorm), ending on conv-norm-GELU with
    :math:`d_0` channels, as the authors' ConvNeXt stems do. Default channels :math:`d_0 / 2^{m-1-i}`
    (``(48, 96)`` for ConvNeXt-T/S); the authors used ``(64, 96, 128)`` for ConvNeXt-B and ``(96, 144, 192)``
    for ConvNeXt-L (pass them as ``channels``).

    Args:
        model: a timm ``VisionTransformer`` (or subclass) whose ``patch_embed.proj`` is still the patchify
            ``nn.Conv2d``, or a timm ``ConvNeXt`` whose ``stem`` is still timm's.
        channels: the 3x3 convolutions' output channels (see :class:`ConvStem`); ``None``: the defaults above.
        norm: ``"layer"`` (the authors' choice) or ``"batch"``.
        act: ``"gelu"`` (the authors' choice) or ``"relu"``.

    Returns:
        ``model`` itself, for chaining.

    Raises:
        TypeError: ``model`` neither a timm ``VisionTransformer`` nor ``ConvNeXt``; bad ``channels`` types.
        ValueError: a non-square patch size or stem stride that is not a power of two; a stem that is not the
            patchify stem (e.g. already replaced); bad ``channels``, ``norm`` or ``act`` (see :class:`ConvStem`).

    Side effects:
        ``model.patch_embed.proj`` (ViT) or ``model.stem`` (ConvNeXt) becomes a new, freshly initialized
        module on the old stem's device and dtype, in its training mode: build the optimizer after the call,
        and load checkpoints after it too. timm's patch-size resampling (``set_input_size(patch_size=...)``,
        pretrained ``patch_embed.proj.weight`` adaptation) no longer applies.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("vit_small_patch16_224", depth=1, num_classes=3, dynamic_img_size=True)
        >>> model = convstem_(model)
        >>> model.patch_embed(torch.rand(1, 3, 224, 224)).shape  # (B, H/16, W/16, D): a 14x14 grid
        torch.Size([1, 14, 14, 384])
        >>> [m.out_channels for m in model.patch_embed.proj.modules() if isinstance(m, torch.nn.Conv2d)]
        [48, 96, 192, 384, 384]

    References:
        Singh, Croce & Hein, "Revisiting Adversarial Training for ImageNet: Architectures, Training and
        Generalization across Threat Models" (ConvStem), NeurIPS 2023, arXiv 2303.01870.
        Xiao et al., "Early Convolutions Help Transformers See Better", arXiv 2106.14881.
        Dosovitskiy et al., "An Image is Worth 16x16 Words" (ViT), arXiv 2010.11929.
        Liu et al., "A ConvNet for the 2020s" (ConvNeXt), arXiv 2201.03545.
    """
    from timm.models.convnext import ConvNeXt
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        old = model.patch_embed.proj
        if not isinstance(old, nn.Conv2d) or old.kernel_size != old.stride or old.padding != (0, 0):
            raise ValueError(f"model.patch_embed.proj must be timm's patchify nn.Conv2d; got {_describe(old)}")
        stride = _square_stride(tuple(old.stride), "patch size")
        chans = channels if channels is not None else tuple(48 * 2**i for i in range(_log2_stride(stride)))
        new = ConvStem(old.in_channels, old.out_channels, channels=chans, stride=stride, norm=norm, act=act)
        model.patch_embed.proj = _like(new, old)
    elif isinstance(model, ConvNeXt):
        old = model.stem
        convs = [m for m in old.modules() if isinstance(m, nn.Conv2d)] if isinstance(old, nn.Sequential) else []
        if not convs:
            raise ValueError(f"model.stem must be timm's ConvNeXt stem (an nn.Sequential); got {_describe(old)}")
        sh, sw = 1, 1
        for conv in convs:
            sh, sw = sh * conv.stride[0], sw * conv.stride[1]
        stride = _square_stride((sh, sw), "stem stride")
        d0, m = convs[-1].out_channels, _log2_stride(stride)
        chans = channels if channels is not None else tuple(max(1, d0 // 2 ** (m - 1 - i)) for i in range(m))
        new = ConvStem(convs[0].in_channels, d0, channels=chans, stride=stride, norm=norm, act=act, project=False)
        model.stem = _like(new, convs[0])
    else:
        raise TypeError(
            f"model must be a timm VisionTransformer or ConvNeXt (e.g. timm.create_model('vit_small_patch16_224')); "
            f"got {type(model).__name__}"
        )
    return model


def _like(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` on ``old``'s device and dtype, in ``old``'s training mode."""
    w = next(old.parameters())
    return new.to(device=w.device, dtype=w.dtype).train(old.training)


def _describe(module: Any) -> str:
    return repr(module).replace("\n", " ")[:200]


def _square_stride(stride: tuple[int, int], name: str) -> int:
    if stride[0] != stride[1]:
        raise ValueError(f"ConvStem needs a square {name}; got {stride}")
    _log2_stride(stride[0], name)
    return stride[0]


def _log2_stride(stride: Any, name: str = "stride") -> int:
    """``m`` with ``stride == 2 ** m``, ``m >= 1``."""
    if isinstance(stride, bool) or not isinstance(stride, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {stride!r}")
    if stride < 2 or stride & (stride - 1):
        raise ValueError(f"{name} must be a power of two >= 2 (stride-2 convolutions reach it); got {stride}")
    return int(stride).bit_length() - 1


def _check_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1; got {value}")
    return int(value)


def _check_channels(channels: Any, minimum: int) -> tuple[int, ...]:
    if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence):
        raise TypeError(f"channels must be a sequence of ints; got {channels!r}")
    chans = tuple(_check_count(c, f"channels[{i}]") for i, c in enumerate(channels))
    if len(chans) < minimum:
        raise ValueError(
            f"channels must hold at least {minimum} entries (one stride-2 convolution per factor 2 of the "
            f"stride); got {chans}"
        )
    return chans


def _norm(norm: Any, chans: int) -> nn.Module:
    match norm:
        case "layer":
            from timm.layers import LayerNorm2d

            return LayerNorm2d(chans, eps=1e-6)
        case "batch":
            return nn.BatchNorm2d(chans)
        case _:
            raise ValueError(f"norm must be 'layer' or 'batch'; got {norm!r}")


def _act(act: Any) -> nn.Module:
    match act:
        case "gelu":
            return nn.GELU()
        case "relu":
            return nn.ReLU()
        case _:
            raise ValueError(f"act must be 'gelu' or 'relu'; got {act!r}")
