"""A timm VisionTransformer forward that runs only the kept patch tokens, and position-embedding resampling."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from advtrain.tokens import _checks
from advtrain.tokens._mask import gather_tokens

if TYPE_CHECKING:  # timm is imported on first use: `import advtrain` stays as light as torch
    from timm.models.vision_transformer import VisionTransformer


def _check_vit(model: Any) -> VisionTransformer:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(
            f"model must be a timm VisionTransformer (e.g. timm.create_model('vit_base_patch16_224')); "
            f"got {type(model).__name__}"
        )
    return model


def _embed(model: VisionTransformer, x: Tensor) -> tuple[Tensor | None, Tensor]:
    """Prefix and patch tokens, ``(B, P, D)`` (``None`` when ``P = 0``) and ``(B, N, D)``, position-embedded.

    The same sums as timm's ``_pos_embed`` (concatenating before or after the add changes no value), without
    its ``pos_drop``.
    """
    pe = model.patch_embed
    if not model.dynamic_img_size and pe.strict_img_size and tuple(x.shape[2:]) != tuple(pe.img_size):
        raise ValueError(
            f"the model runs at img_size {tuple(pe.img_size)}; got x of shape {tuple(x.shape)}. Resample it "
            f"with resample_vit_(model, img_size=...) or create it with dynamic_img_size=True"
        )
    patches = pe(x)
    grid = tuple(pe.grid_size)
    if patches.ndim == 4:  # NHWC, from a dynamic_img_size model
        grid = tuple(patches.shape[1:3])
        patches = patches.flatten(1, 2)
    b, p = patches.shape[0], model.num_prefix_tokens
    prefix = [t.expand(b, -1, -1) for t in (model.cls_token, model.reg_token) if t is not None]
    prefix = torch.cat(prefix, dim=1) if prefix else None
    if model.pos_embed is None:
        return prefix, patches
    pos_p = 0 if model.no_embed_class else p
    pos = model.pos_embed
    if model.dynamic_img_size:
        from timm.layers import resample_abs_pos_embed

        pos = resample_abs_pos_embed(pos, new_size=grid, old_size=pe.grid_size, num_prefix_tokens=pos_p)
    if pos_p:
        prefix = prefix + pos[:, :pos_p]
    return prefix, patches + pos[:, pos_p:]


def vit_forward_tokens(model: VisionTransformer, x: Tensor, *, indices: Tensor | None = None) -> Tensor:
    r"""Runs a timm ``VisionTransformer`` on the kept patch tokens only, and returns its head's output.

    Patch embedding and position embedding (resampled to ``x``'s grid for a ``dynamic_img_size`` model), then
    the gather :math:`[\text{prefix}, u_{i_1}, \dots, u_{i_K}]` (:func:`gather_tokens`), then the model's own
    ``pos_drop``, ``patch_drop``, ``norm_pre``, blocks (gradient checkpointing honoured), ``norm`` and
    ``forward_head``. Every block sees :math:`P + K` tokens instead of :math:`P + N`, so the block FLOPs fall
    as :math:`(P + K) / (P + N)` (linear layers) and its square (attention); only the patch embedding (about
    1% of ViT-B/16's FLOPs) still covers the whole image. With ``indices=None`` the result equals
    ``model(x)`` exactly. Works on any input size the model accepts: its own ``img_size`` (see
    :func:`resample_vit_`) or any multiple of the patch size when it was built with ``dynamic_img_size=True``.

    To attack the reduced model, close over the indices, so the attack and the training step see the same
    tokens: ``pgd(functools.partial(vit_forward_tokens, model, indices=idx), x, y, ...)``.

    Args:
        model: a timm ``VisionTransformer`` (any pooling, class/register tokens, ``no_embed_class``,
            ``pre_norm``); it runs in whatever mode it is in. One built with ``patch_drop_rate > 0`` drops a
            further fraction of the kept tokens in train mode, as its own forward would.
        x: ``(B, C, H, W)`` images, normalized as the model expects.
        indices: ``(B, K)`` int64 indices into the :math:`N = (H / p)(W / p)` patch tokens of ``x``'s grid
            (row-major), on ``x``'s device, from :func:`sample_random_indices` or :func:`sample_block_indices`;
            ``None`` keeps every token.

    Returns:
        The head's output, ``(B, num_classes)`` logits for a classifier.

    Raises:
        TypeError: ``model`` not a ``VisionTransformer``; a non-floating ``x``; ``indices`` not int64.
        ValueError: ``x`` not 4-D or not of the model's size (a fixed-size model); ``indices`` not ``(B, K)``
            with ``1 <= K <= N``.

    Example:
        >>> import timm, torch
        >>> from advtrain.tokens import sample_random_indices
        >>> model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=3).eval()
        >>> x = torch.rand(2, 3, 64, 64)
        >>> idx = sample_random_indices(2, 16, keep_ratio=0.5, generator=torch.Generator().manual_seed(0))
        >>> vit_forward_tokens(model, x, indices=idx).shape
        torch.Size([2, 3])
        >>> torch.equal(vit_forward_tokens(model, x), model(x))
        True

    References:
        Dosovitskiy et al., "An Image is Worth 16x16 Words" (ViT), arXiv 2010.11929.
        Li et al., "Scaling Language-Image Pre-training via Masking" (FLIP), arXiv 2212.00794.
        Wang et al., "Revisiting Adversarial Training at Scale" (AdvXL), arXiv 2401.04727.
    """
    model = _check_vit(model)
    _checks.check_images(x)
    prefix, patches = _embed(model, x)
    if indices is not None:
        _checks.check_indices(indices, patches.shape[0], patches.shape[1])
        patches = gather_tokens(patches, indices)
    h = patches if prefix is None else torch.cat([prefix, patches], dim=1)  # timm's memory layout, too
    h = model.norm_pre(model.patch_drop(model.pos_drop(h)))
    if model.grad_checkpointing and not torch.jit.is_scripting():
        from timm.models import checkpoint_seq

        h = checkpoint_seq(model.blocks, h)
    else:
        h = model.blocks(h)
    return model.forward_head(model.norm(h))


def resample_vit_(model: VisionTransformer, *, img_size: int | tuple[int, int]) -> VisionTransformer:
    r"""Sets a timm ``VisionTransformer``'s input size in place, resampling its absolute position embedding.

    The patch-token part of the position embedding, a :math:`G_h \times G_w` grid of vectors, is interpolated
    bicubically (anti-aliased when shrinking) to the new grid :math:`(H / p, W / p)`; prefix entries are kept
    as they are. This is timm's own ``model.set_input_size`` (``timm.layers.resample_abs_pos_embed``), which
    also updates ``patch_embed``'s ``img_size`` and grid: AdvXL's coarse-to-fine schedule trains at 112 px,
    fine-tunes at 224 and evaluates at 336. At the current size nothing changes.

    Args:
        model: a timm ``VisionTransformer``.
        img_size: the new ``(H, W)`` in pixels, each a multiple of the patch size (unless the model pads
            dynamically); an int ``s`` means ``(s, s)``.

    Returns:
        ``model`` itself, for chaining.

    Raises:
        TypeError: ``model`` not a ``VisionTransformer``; ``img_size`` not an int or a pair of ints.
        ValueError: a side below 1 or not a multiple of the patch size.

    Side effects:
        ``model.pos_embed`` becomes a new ``nn.Parameter`` (same device, dtype and ``requires_grad``) when the
        grid changes: build the optimizer after the call. ``model.patch_embed``'s ``img_size``,
        ``grid_size`` and ``num_patches`` change.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("vit_tiny_patch16_224", img_size=112, depth=2, num_classes=3)
        >>> resample_vit_(model, img_size=224).pos_embed.shape
        torch.Size([1, 197, 192])
        >>> model.eval()(torch.rand(1, 3, 224, 224)).shape
        torch.Size([1, 3])

    References:
        Wang et al., "Revisiting Adversarial Training at Scale" (AdvXL, Sec. 3.2), arXiv 2401.04727.
        Touvron et al., "Fixing the train-test resolution discrepancy", arXiv 1906.06423.
    """
    model = _check_vit(model)
    h, w = _checks.check_pair(img_size, "img_size")
    ph, pw = model.patch_embed.patch_size
    if not model.patch_embed.dynamic_img_pad and (h % ph or w % pw):
        raise ValueError(f"img_size {(h, w)} must be a multiple of the patch size {(ph, pw)}")
    model.set_input_size(img_size=(h, w))
    return model
