"""FSDP2 (``fully_shard``) per block, activation checkpointing per block, and the checks that go with them."""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

Precision = Literal["fp32", "bf16"]
PRECISIONS = ("fp32", "bf16")


def unwrap(model: nn.Module) -> nn.Module:
    """The innermost model behind wrapper attributes: ``.inner`` (the recipes' ``Normalized``), ``.module``.

    Follows ``.inner`` and ``.module`` (DDP, :class:`advtrain.attacks.DetachedParams`, timm's EMA) while they
    hold an ``nn.Module``.

    Example:
        >>> import torch
        >>> class Wrap(torch.nn.Module):
        ...     def __init__(self, inner):
        ...         super().__init__()
        ...         self.inner = inner
        >>> lin = torch.nn.Linear(2, 2)
        >>> unwrap(Wrap(lin)) is lin
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        for attr in ("inner", "module"):
            child = getattr(model, attr, None)
            if isinstance(child, nn.Module):
                model = child
                break
        else:
            return model
    return model


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated units to shard (and checkpoint) one by one: ViT blocks, ConvNeXt stages, ResNet layers.

    Looks through :func:`unwrap` for, in order: ``blocks`` (timm ViT, DeiT, EVA, BEiT), ``stages`` (ConvNeXt,
    and other timm convnets organized in stages), ``layer1`` ... ``layer4`` (timm and torchvision ResNets).
    Each unit gets its own FSDP parameter group (one all-gather and one reduce-scatter), so the unsharded
    parameters held at any time are about two units' worth (the current one and the prefetched next one).

    Args:
        model: a timm model, or a wrapper holding one at ``.inner`` / ``.module``.

    Returns:
        The block modules, in forward order (at least one).

    Raises:
        TypeError: ``model`` is not a module.
        ValueError: no ``blocks``, ``stages`` or ``layerN`` was found (pass ``blocks=`` to
            :func:`shard_model_` explicitly).

    Example:
        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, embed_dim=32,
        ...                         num_heads=2, num_classes=10)
        >>> len(find_blocks(vit))
        3
    """
    inner = unwrap(model)
    for attr in ("blocks", "stages"):
        units = getattr(inner, attr, None)
        if isinstance(units, (nn.Sequential, nn.ModuleList)) and len(units):
            return list(units)
    layers = [
        getattr(inner, f"layer{i}") for i in range(1, 5) if isinstance(getattr(inner, f"layer{i}", None), nn.Module)
    ]
    if layers:
        return layers
    raise ValueError(
        f"no blocks, stages or layer1..layer4 found in {type(inner).__name__}; pass blocks=[...] explicitly"
    )


def mixed_precision_policy(precision: Precision):
    r"""The FSDP2 ``MixedPrecisionPolicy`` of a run's precision.

    ``"bf16"``: parameters all-gathered and computed in bfloat16, gradients reduce-scattered in float32 (the
    sharded float32 parameters are the optimizer's master weights), the root's output cast back to float32 so
    the loss and the attack's loss are computed in float32. Floating inputs of every FSDP module are cast to
    bfloat16, the images included: the model sees pixels rounded to bfloat16 (spacing :math:`2^{-8}` on
    [0.5, 1), about 1/255), as it sees them after the first cast under autocast; the attack's perturbation
    itself stays in float32. ``"fp32"``: no casting.

    Args:
        precision: ``"fp32"`` or ``"bf16"``.

    Returns:
        ``(block_policy, root_policy)``.

    Raises:
        ValueError: an unknown precision.

    Example:
        >>> block, root = mixed_precision_policy("bf16")
        >>> block.param_dtype, block.reduce_dtype, root.output_dtype
        (torch.bfloat16, torch.float32, torch.float32)
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    match precision:
        case "fp32":
            return MixedPrecisionPolicy(), MixedPrecisionPolicy()
        case "bf16":
            block = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            root = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.float32
            )
            return block, root
    raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")


def _parents(model: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    return {id(child): (parent, name) for parent in model.modules() for name, child in parent.named_children()}


def checkpoint_blocks_(model: nn.Module, *, blocks: list[nn.Module] | None = None) -> list[nn.Module]:
    r"""Wraps each block in non-reentrant activation checkpointing, in place; returns the wrapped blocks.

    A checkpointed block keeps only its input during the forward pass and recomputes its activations in the
    backward pass, so the activations held at the end of the forward fall from :math:`L\,a_{block}` to
    :math:`L\,a_{in} + a_{block}` (``L`` blocks; :math:`a_{in}` one block input, :math:`a_{block}` one block's
    saved tensors while it is recomputed) at the cost of one more forward of every block per backward: a
    training step costs about 4/3 of one without. The attack's backward recomputes too.

    Uses ``torch.distributed.algorithms._checkpoint.checkpoint_wrapper`` (``CheckpointImpl.NO_REENTRANT``,
    i.e. ``torch.utils.checkpoint(..., use_reentrant=False)``): ``state_dict`` keys stay as they were (the
    wrapper strips its ``_checkpoint_wrapped_module.`` prefix, and so do DCP's ``get_state_dict`` names), so
    checkpoints load into an unwrapped model and back; a parent's ``named_parameters()`` does show the prefix.
    Apply it before :func:`torch.distributed.fsdp.fully_shard` (which :func:`shard_model_`
    does) and before DDP; it works without FSDP too.

    Args:
        model: the model (a wrapper holding a timm model is fine).
        blocks: the modules to wrap (default: :func:`find_blocks`); each must be a child of some module of
            ``model``.

    Returns:
        The wrapper modules, in the order of ``blocks``.

    Raises:
        ValueError: a block is not inside ``model``, or is wrapped already.

    Side effects:
        Replaces each block by its wrapper in its parent module.

    Example:
        >>> import timm, torch
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32,
        ...                         num_heads=2, num_classes=10)
        >>> keys = list(vit.state_dict())
        >>> _ = checkpoint_blocks_(vit)
        >>> list(vit.state_dict()) == keys
        True

    References:
        Chen et al., "Training Deep Nets with Sublinear Memory Cost", arXiv 1604.06174.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        CheckpointWrapper,
        checkpoint_wrapper,
    )

    blocks = find_blocks(model) if blocks is None else list(blocks)
    parents = _parents(model)
    wrapped = []
    for block in blocks:
        if isinstance(block, CheckpointWrapper):
            raise ValueError(f"block {type(block._checkpoint_wrapped_module).__name__} is checkpointed already")
        if id(block) not in parents:
            raise ValueError(f"block {type(block).__name__} is not a submodule of {type(model).__name__}")
        parent, name = parents[id(block)]
        w = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        setattr(parent, name, w)  # Sequential / ModuleList children are set by their string index
        wrapped.append(w)
    return wrapped


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model`` or any of its submodules.

    Example:
        >>> import torch
        >>> is_sharded(torch.nn.Linear(2, 2))
        False
    """
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def shard_model_(
    model: nn.Module,
    *,
    precision: Precision,
    activation_checkpointing: bool = False,
    blocks: list[nn.Module] | None = None,
    mesh=None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    r"""Shards ``model`` with FSDP2: ``fully_shard`` on every block, then on the root; returns ``model``.

    Every rank then holds :math:`1/W` of each parameter (dim-0 shards, a ``DTensor``), of its gradient and of
    the optimizer state built on it afterwards. Forward and backward all-gather one block's parameters at a
    time (in ``param_dtype``) and reduce-scatter its gradients right after its backward, averaged over ranks
    like DDP's all-reduce, so a step equals the single-process step on the global batch (up to float
    summation order). The root group (patch embedding, position embedding, final norm, head) stays gathered
    from the forward to the backward.

    Attacks: pass the sharded model itself to :func:`advtrain.pgd` / :func:`advtrain.attacks.apgd`, eagerly.
    Their ``torch.autograd.grad(loss, delta)`` only runs the autograd nodes on the path to ``delta``: no weight
    gradient is computed (a linear layer's backward computes :math:`g W` but not :math:`g^T x`), no
    ``AccumulateGrad`` runs, so FSDP's post-backward hook finds no unsharded gradient and issues no
    reduce-scatter (it does all-gather each block again for the backward, as training does). No parameter's
    ``requires_grad`` is toggled and no FSDP setting changes. Tested: zero reduce-scatter calls, ``.grad`` stays
    ``None`` and the adversarial images equal the unsharded model's. (A compiled attack is not covered here.)

    Order: build the model (and an EMA copy), then :func:`shard_model_` (which applies
    :func:`checkpoint_blocks_` first when asked), then create the optimizer over ``model.parameters()``, then
    load a checkpoint (:func:`load_checkpoint`). Under FSDP every forward is a collective: all ranks must call
    the model the same number of times (evaluation included).

    Args:
        model: the model; a recipe's ``Normalized`` wrapper holding a timm model at ``.inner`` is fine. Its
            parameters must be on the device of the mesh (CUDA under NCCL, CPU under gloo).
        precision: ``"fp32"`` or ``"bf16"`` (:func:`mixed_precision_policy`).
        activation_checkpointing: checkpoint each block (:func:`checkpoint_blocks_`).
        blocks: the units to shard (default :func:`find_blocks`).
        mesh: a 1-D ``DeviceMesh`` (default: all ranks of the default process group, on the device type of
            the parameters).
        reshard_after_forward: free each block's gathered parameters after its forward (ZeRO-3; ``False``
            keeps them until the backward, ZeRO-2-like: less communication, more memory).

    Returns:
        ``model`` itself, now an ``FSDPModule`` whose parameters are ``DTensor`` shards.

    Raises:
        RuntimeError: no default process group (call ``torch.distributed.init_process_group`` first).
        ValueError: ``model`` is sharded already; an unknown precision; no blocks found.

    Side effects:
        Replaces ``model``'s parameters by sharded ones (and its blocks by checkpoint wrappers); changes the
        class of the sharded modules (FSDP2 does so).

    Example:
        >>> model = shard_model_(build_model(), precision="bf16", activation_checkpointing=True)  # doctest: +SKIP
        >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # doctest: +SKIP

    References:
        Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models", arXiv
        1910.02054. Zhao et al., "PyTorch FSDP", arXiv 2304.11277.
    """
    from torch.distributed.fsdp import fully_shard

    block_mp, root_mp = mixed_precision_policy(precision)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_model_ needs a process group: call torch.distributed.init_process_group first")
    if is_sharded(model):
        raise ValueError(f"{type(model).__name__} is sharded already")
    blocks = find_blocks(model) if blocks is None else list(blocks)
    if activation_checkpointing:
        blocks = checkpoint_blocks_(model, blocks=blocks)
    if mesh is None:  # the parameters' device type decides (gloo on CPU even where CUDA exists), not the default
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if device.type != "meta":
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kw = {} if mesh is None else {"mesh": mesh}
    for block in blocks:
        fully_shard(block, mp_policy=block_mp, reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(model, mp_policy=root_mp, reshard_after_forward=reshard_after_forward, **kw)
    return model


def check_fsdp_compatible(model: nn.Module, *, recycling: bool, compile: bool) -> None:
    """Raises ``ValueError`` for what this library does not support under FSDP; call it at config time.

    Not supported (use ``run.parallel=ddp``): split (auxiliary) BatchNorm (:mod:`advtrain.bn`, Fast AdvProp,
    AdvProp), gradient recycling (:mod:`advtrain.recycle`: several backward passes accumulate into ``.grad``
    with DDP's ``no_sync`` and divide per parameter group afterwards; none of it is tested on sharded
    gradients), and ``torch.compile`` together with FSDP (untested here). Plain BatchNorm is allowed: FSDP
    does not broadcast buffers as DDP does, so call :func:`broadcast_buffers_` before each forward to keep the
    running statistics identical on every rank. Scalar (0-dim) parameters are refused too: ``fully_shard`` does
    not shard them (the AdvXL recipe's CLIP-text temperature ``logit_scale`` is one). The model may live on the
    meta device (no memory).

    Args:
        model: the unsharded model as the recipe built it.
        recycling: the recipe recycles gradients (``advtrain.recycle``).
        compile: the recipe compiles the model or the attack.

    Raises:
        ValueError: one of the above, naming it and the way out.

    Example:
        >>> import torch
        >>> check_fsdp_compatible(torch.nn.Linear(2, 2), recycling=False, compile=False)
        >>> check_fsdp_compatible(torch.nn.Linear(2, 2), recycling=True, compile=False)
        Traceback (most recent call last):
        ...
        ValueError: gradient recycling (advtrain.recycle) is not supported under FSDP; use run.parallel=ddp
    """
    from advtrain.bn import SplitBatchNorm, SplitSyncBatchNorm

    split = sorted({n for n, m in model.named_modules() if isinstance(m, (SplitBatchNorm, SplitSyncBatchNorm))})
    if split:
        raise ValueError(
            f"split BatchNorm (advtrain.bn) is not supported under FSDP; use run.parallel=ddp "
            f"(found {len(split)}, e.g. {split[0]!r})"
        )
    scalars = [n for n, p in model.named_parameters() if p.ndim == 0]
    if scalars:
        raise ValueError(
            f"fully_shard does not shard scalar parameters ({', '.join(scalars[:3])}); use run.parallel=ddp"
        )
    if recycling:
        raise ValueError("gradient recycling (advtrain.recycle) is not supported under FSDP; use run.parallel=ddp")
    if compile:
        raise ValueError(
            "torch.compile with FSDP is not supported by advtrain.parallel yet; set run.compile=false "
            "or use run.parallel=ddp"
        )


def broadcast_buffers_(model: nn.Module, *, src: int = 0) -> None:
    """Copies every floating or integer buffer from rank ``src`` to all ranks (DDP's ``broadcast_buffers``).

    FSDP shards parameters only; buffers such as BatchNorm running statistics stay per rank and drift apart
    (each rank normalizes its own slice of the batch). DDP broadcasts them from rank 0 before every forward;
    call this at the same place to get DDP's semantics (and identical checkpoints on every rank). No-op
    without a process group or with a world of one.

    Args:
        model: any module (sharded or not).
        src: the rank whose buffers win.

    Side effects:
        Overwrites the buffers of every rank but ``src`` in place.

    Example:
        >>> import torch
        >>> broadcast_buffers_(torch.nn.BatchNorm1d(3))  # no process group: nothing to do
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for b in model.buffers():
        dist.broadcast(b.data, src=src)
