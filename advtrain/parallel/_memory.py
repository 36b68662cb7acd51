"""An analytic per-GPU memory model of adversarial training under DDP and FSDP, with or without checkpointing."""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import nn

from advtrain.parallel._fsdp import PRECISIONS, Precision, find_blocks, unwrap

Parallel = Literal["ddp", "fsdp"]
GiB = 1024**3


class MemoryEstimate(NamedTuple):
    """Per-GPU bytes of one training step's largest moment (the start of the backward), by component."""

    model: str
    img_size: int  # px
    tokens: int  # tokens per image (ViTs: patches + prefix tokens; convnets: 0)
    batch_per_gpu: int
    world: int
    parallel: str
    activation_checkpointing: bool
    precision: str
    n_params: int
    params: int  # bytes: fp32 parameters (FSDP: this rank's shards; they are the master weights under bf16)
    grads: int  # bytes: fp32 gradients (FSDP: shards)
    optim: int  # bytes: AdamW exp_avg + exp_avg_sq, fp32 (FSDP: shards)
    working: int  # bytes: DDP gradient buckets and autocast's bf16 weight copies / FSDP gathered units
    activations: int  # bytes: tensors saved for the backward (+ one recomputed block under checkpointing)
    ema: int = 0  # bytes: an fp32 EMA copy of the parameters (FSDP: shards); 0 without one

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optim + self.working + self.activations + self.ema


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _shard_numel(p: torch.Tensor, world: int) -> int:
    """Elements of one rank's FSDP2 shard: dim 0 padded up to a multiple of the world size."""
    if p.ndim == 0:
        return 1
    rows = math.ceil(p.shape[0] / world)
    return rows * (p.numel() // max(1, p.shape[0]))


_META: dict[tuple, nn.Module] = {}


def _meta_model(name: str, num_classes: int, model_kwargs: dict) -> nn.Module:
    """The timm model on the meta device (no memory), cached: the estimate only reads its structure."""
    import timm

    key = (name, num_classes, repr(sorted(model_kwargs.items())))
    if key not in _META:
        if len(_META) >= 16:
            _META.pop(next(iter(_META)))
        with torch.device("meta"):
            _META[key] = timm.create_model(name, pretrained=False, num_classes=num_classes, **model_kwargs)
    return _META[key]


def vit_block_bytes_per_token(*, dim: int, mlp_hidden: int, heads: int, mode: str, layer_scale: bool = False) -> int:
    r"""Bytes one pre-norm ViT block saves for its backward, per token.

    With width :math:`D`, MLP hidden width :math:`F` and :math:`H` heads, a timm ``Block`` (LayerNorm,
    qkv linear, fused scaled-dot-product attention, proj linear, LayerNorm, fc1, GELU, fc2, two residual adds)
    saves per token: both LayerNorm inputs (:math:`2D`) and their mean and rstd (4 fp32), the qkv input
    (:math:`D`), q, k and v (:math:`3D`, one storage), the attention output (:math:`D`, also the proj input)
    and its log-sum-exp (:math:`H` fp32), the fc1 input (:math:`D`), the GELU input and the fc2 input
    (:math:`2F`). That is :math:`8D + 2F` activations of the compute dtype plus :math:`16 + 4H` bytes:

    .. math::
        \text{fp32: } 4(8D + 2F) + 16 + 4H, \quad
        \text{bf16 autocast: } 4 \cdot 2D + 2(6D + 2F) + 16 + 4H, \quad
        \text{bf16 parameters: } 2(8D + 2F) + 16 + 4H.

    Under autocast the residual stream and the LayerNorm inputs stay fp32; with bf16 parameters (FSDP's
    mixed precision, no autocast) everything is bf16. Fused attention (flash / memory-efficient, and PyTorch's
    CPU flash kernel) saves no :math:`N \times N` matrix; the math fallback would. Layer scale adds :math:`2D`.
    Dropout 0 and drop-path save nothing per token. The LayerNorm statistics are fp32 as CUDA's kernel keeps
    them (``torch._refs.native_layer_norm``: fp32 on CUDA, the input dtype on CPU, so a bf16 block on CPU
    saves 8 bytes per token less). Checked against the saved tensors of real timm blocks on CPU: exact for
    fp32 and autocast, 8 bytes per token over for bf16 (``tests/parallel/test_memory.py``).

    Args:
        dim: :math:`D`.
        mlp_hidden: :math:`F`.
        heads: :math:`H`.
        mode: ``"fp32"``, ``"autocast"`` (bf16 autocast over fp32 parameters) or ``"bf16"`` (bf16 parameters).
        layer_scale: the block has LayerScale (``init_values``).

    Returns:
        Bytes per token.

    Example:
        >>> vit_block_bytes_per_token(dim=768, mlp_hidden=3072, heads=12, mode="autocast")  # ViT-B
        27712
    """
    elems = 8 * dim + 2 * mlp_hidden + (2 * dim if layer_scale else 0)
    small = 16 + 4 * heads
    match mode:
        case "fp32":
            return 4 * elems + small
        case "autocast":
            return 4 * 2 * dim + 2 * (elems - 2 * dim) + small
        case "bf16":
            return 2 * elems + small
    raise ValueError(f"unknown mode {mode!r}; expected 'fp32', 'autocast' or 'bf16'")


def _compute_mode(parallel: str, precision: str) -> str:
    if precision == "fp32":
        return "fp32"
    return "bf16" if parallel == "fsdp" else "autocast"


def _vit_activations(inner: nn.Module, *, img_size: int, batch: int, mode: str, checkpointing: bool):
    blocks = list(inner.blocks)
    b0 = blocks[0]
    dim = inner.embed_dim
    heads = b0.attn.num_heads
    hidden = b0.mlp.fc1.out_features
    ls = type(getattr(b0, "ls1", nn.Identity())).__name__ == "LayerScale"
    p = inner.patch_embed.patch_size
    p = p[0] if isinstance(p, (tuple, list)) else int(p)
    tokens = (img_size // p) ** 2 + getattr(inner, "num_prefix_tokens", 1)
    t = batch * tokens
    per_block = t * vit_block_bytes_per_token(dim=dim, mlp_hidden=hidden, heads=heads, mode=mode, layer_scale=ls)
    act = 2 if mode != "fp32" else 4  # bytes of a (cast) matmul / conv input
    resid = 2 if mode == "bf16" else 4  # bytes of the residual stream (a block's input)
    # outside the blocks: the patch embedding's (cast) input; then, with class-token pooling, the final
    # LayerNorm's input and statistics and the head's input (a view of the normalized tokens, except under
    # autocast, which saves a bf16 copy of the class token); with average pooling, the same on pooled (B, D)
    outside = batch * 3 * img_size**2 * act
    if getattr(inner, "global_pool", "token") in ("token", ""):
        outside += t * (resid * dim + 8) + (batch * dim * 2 if mode == "autocast" else t * dim * act)
    else:
        outside += batch * (resid * dim + 8) + batch * dim * act
    if checkpointing:
        return tokens, len(blocks) * t * dim * resid + per_block + outside
    return tokens, len(blocks) * per_block + outside


def _traced_activations(model: nn.Module, *, img_size: int, batch: int, mode: str, checkpointing: bool) -> int:
    """Saved-tensor bytes of a meta-device forward (convnets: no attention kernel to mis-trace)."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    blocks = find_blocks(model)
    seen: dict[int, int] = {}
    owner: dict[int, int] = {}
    current = [-1]
    inputs: list[int] = []

    def pre(i):
        def hook(_module, args):
            current[0] = i
            x = args[0]
            inputs.append(x.numel() * x.element_size())

        return hook

    def post(_module, _args, _out):
        current[0] = -1

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in params and key not in seen:
            seen[key] = t.untyped_storage().nbytes()
            owner[key] = current[0]
        return t

    handles = [blk.register_forward_pre_hook(pre(i)) for i, blk in enumerate(blocks)]
    handles += [blk.register_forward_hook(post) for blk in blocks]
    try:
        x = torch.empty(batch, 3, img_size, img_size, device="meta", requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
    finally:
        for h in handles:
            h.remove()
    scale = 0.5 if mode != "fp32" else 1.0  # bf16 activations: half of the fp32 trace (approximation)
    per_block = [0] * len(blocks)
    outside = 0
    for key, n in seen.items():
        if owner[key] >= 0:
            per_block[owner[key]] += n
        else:
            outside += n
    if checkpointing:
        return int(scale * (sum(inputs) + max(per_block) + outside))
    return int(scale * (sum(per_block) + outside))


def estimate_memory(
    model_name: str,
    *,
    img_size: int,
    batch_per_gpu: int,
    world: int,
    parallel: Parallel,
    activation_checkpointing: bool,
    precision: Precision,
    num_classes: int = 1000,
    model_kwargs: dict | None = None,
    ema: bool = False,
) -> MemoryEstimate:
    r"""Per-GPU memory of an AdamW adversarial-training step: parameters, gradients, optimizer, activations.

    Parameter counts come from the timm model instantiated on the meta device (no memory). With :math:`P`
    parameters, world :math:`W`, per-block parameters :math:`P_b` and the rest (embeddings, head) :math:`P_r`:

    * DDP: parameters :math:`4P`, gradients :math:`4P`, AdamW :math:`8P` (``exp_avg``, ``exp_avg_sq``);
      working set: DDP's gradient buckets :math:`4P` (``gradient_as_bucket_view=False``, the default; none for
      :math:`W = 1`) plus, under bf16 autocast, the cached bf16 copies of every linear/conv weight that the
      backward keeps (:math:`2P_{mm}`).
    * FSDP: this rank's dim-0 shards (padded) of parameters, gradients and AdamW, in fp32 (the sharded fp32
      parameters are the master weights under bf16); working set: the gathered root group plus two gathered
      blocks (current and prefetched) in the compute dtype, and during the backward one block's unsharded
      gradient plus its fp32 reduce-scatter buffer: :math:`c(P_r + 2P_b) + (c + 4)\max(P_r, 2P_b)` bytes,
      :math:`c` = 2 (bf16) or 4.
    * Activations: ViTs by :func:`vit_block_bytes_per_token` times the tokens of the per-GPU batch, per block,
      plus the patch-embedding input, the final norm and the head; with activation checkpointing each block
      keeps only its input and one block at a time is recomputed during the backward. Convnets: the saved
      tensors of a meta-device forward (bf16: half of fp32, approximately). DDP under bf16 runs autocast; FSDP
      under bf16 runs bf16 parameters without autocast.

    The attack (forward plus input gradient, no weight gradients) saves the same activations and adds no
    gradients, so a training step's peak bounds it. Not modelled: allocator fragmentation and caching, kernel
    workspaces, NCCL buffers, data-loader pinned memory. With ``ema=True`` an fp32 EMA copy adds :math:`4P`
    (DDP) or this rank's shards, :math:`4P/W` (FSDP). None of these figures has been measured on a GPU;
    ``tests/parallel/test_memory.py`` checks them against CPU measurements of small models.

    Args:
        model_name: a timm model name.
        img_size: training resolution in pixels (the ViT token count follows from it).
        batch_per_gpu: images per GPU per step (the global batch divided by the world size).
        world: number of GPUs (data-parallel ranks), ``>= 1``.
        parallel: ``"ddp"`` or ``"fsdp"``.
        activation_checkpointing: checkpoint every block.
        precision: ``"fp32"`` or ``"bf16"``.
        num_classes: head size.
        model_kwargs: extra ``timm.create_model`` arguments (e.g. ``embed_dim`` of a small ViT).
        ema: count an fp32 EMA copy of the parameters (``optim.ema_decay`` set), sharded like them under FSDP.

    Returns:
        :class:`MemoryEstimate` (bytes per component; ``.total``).

    Raises:
        ValueError: non-positive sizes, an unknown ``parallel`` or ``precision``.

    Example:
        >>> e = estimate_memory("vit_base_patch16_224", img_size=224, batch_per_gpu=64, world=64,
        ...                     parallel="fsdp", activation_checkpointing=False, precision="bf16")
        >>> e.n_params, e.tokens, round(e.total / 2**30, 1)
        (86567656, 197, 3.7)
    """
    for name, v in (("img_size", img_size), ("batch_per_gpu", batch_per_gpu), ("world", world)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1; got {v!r}")
    if parallel not in ("ddp", "fsdp"):
        raise ValueError(f"parallel must be 'ddp' or 'fsdp'; got {parallel!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
    model = _meta_model(model_name, num_classes, dict(model_kwargs or {}))
    inner = unwrap(model)
    n = _count(model)
    blocks = find_blocks(model)
    p_block = max(_count(b) for b in blocks)
    p_rest = n - sum(_count(b) for b in blocks)
    mode = _compute_mode(parallel, precision)
    c = 4 if precision == "fp32" else 2
    if parallel == "ddp":
        params, grads, optim = 4 * n, 4 * n, 8 * n
        buckets = 4 * n if world > 1 else 0
        mm = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
        working = buckets + (2 * mm if mode == "autocast" else 0)
    else:
        shard = sum(_shard_numel(p, world) for p in model.parameters())
        params, grads, optim = 4 * shard, 4 * shard, 8 * shard
        working = c * (p_rest + 2 * p_block) + (c + 4) * max(p_rest, 2 * p_block)
    if hasattr(inner, "blocks") and hasattr(inner, "patch_embed"):
        tokens, acts = _vit_activations(
            inner, img_size=img_size, batch=batch_per_gpu, mode=mode, checkpointing=activation_checkpointing
        )
    else:
        tokens = 0
        acts = _traced_activations(
            model, img_size=img_size, batch=batch_per_gpu, mode=mode, checkpointing=activation_checkpointing
        )
    return MemoryEstimate(
        model_name,
        img_size,
        tokens,
        batch_per_gpu,
        world,
        parallel,
        activation_checkpointing,
        precision,
        n,
        params,
        grads,
        optim,
        working,
        acts,
        params if ema else 0,
    )


def format_memory_estimate(e: MemoryEstimate) -> str:
    """One line for a ``--dry-run``: the per-GPU estimate by component, in GiB.

    Example:
        >>> e = estimate_memory("vit_base_patch16_224", img_size=112, batch_per_gpu=64, world=64, parallel="ddp",
        ...                     activation_checkpointing=False, precision="bf16")
        >>> print(format_memory_estimate(e))  # doctest: +ELLIPSIS
        vit_base_patch16_224 112px (50 tokens) x 64/GPU, 64 GPUs, ddp, bf16: ... GiB per GPU (params ...)
    """
    ac = " + activation checkpointing" if e.activation_checkpointing else ""
    tok = f" ({e.tokens} tokens)" if e.tokens else ""
    g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
    return (
        f"{e.model} {e.img_size}px{tok} x {e.batch_per_gpu}/GPU, {e.world} GPUs, {e.parallel}{ac}, "
        f"{e.precision}: {g(e.total)} GiB per GPU (params {g(e.params)}, grads {g(e.grads)}, "
        f"AdamW {g(e.optim)}, {f'EMA {g(e.ema)}, ' if e.ema else ''}working {g(e.working)}, "
        f"activations {g(e.activations)}; "
        f"{e.n_params / 1e6:.0f}M parameters; estimate, not measured on a GPU)"
    )
