"""The work the distributed tests run on each rank, and the single-process references they compare against.

A tiny timm ViT (img 32, patch 8, depth 2, width 32) inside a ``Normalized`` wrapper like the recipes'; AdamW
with weight decay and gradient clipping; each step attacks its batch with PGD-1 (no random start, so every
layout sees the same perturbation) in eval mode and trains on the result. Global batch 8, dealt in contiguous
slices to the ranks.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from advtrain import pgd

GLOBAL_BATCH = 8
LR = 3e-3


class Normalized(nn.Module):
    """The recipes' wrapper: pixels in, normalization inside, the timm model at ``.inner``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5), persistent=False)
        self.register_buffer("std", torch.full((1, 3, 1, 1), 0.25), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


TIMM = dict(
    model_name="vit_tiny_patch16_224",
    img_size=32,
    patch_size=8,
    depth=2,
    embed_dim=32,
    num_heads=2,
    num_classes=10,
    drop_path_rate=0.0,
)


def make_model(seed: int = 0) -> Normalized:
    import timm

    torch.manual_seed(seed)
    return Normalized(timm.create_model(pretrained=False, **TIMM))


def make_convnext(seed: int = 0) -> Normalized:
    """A narrow ConvNeXt (LayerNorm, no BatchNorm): sharded per stage."""
    import timm

    torch.manual_seed(seed)
    return Normalized(
        timm.create_model("convnext_atto", pretrained=False, num_classes=10, dims=(8, 16, 16, 16), depths=(1, 1, 1, 1))
    )


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.05, betas=(0.9, 0.95))


def global_batch(step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.rand(GLOBAL_BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)


def attack(model: nn.Module, x: Tensor, y: Tensor, steps: int = 1) -> Tensor:
    was = model.training
    model.eval()
    out = pgd(model, x, y, eps=8 / 255, step_size=4 / 255, steps=steps, random_start=False)
    model.train(was)
    return out


def train(model, opt, *, steps: range, rank: int = 0, world: int = 1) -> list[float]:
    """Adversarial training steps; returns the global-batch loss of each step (averaged over ranks)."""
    per = GLOBAL_BATCH // world
    losses = []
    model.train()
    for s in steps:
        x, y = global_batch(s)
        x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        xa = attack(model, x, y)
        loss = F.cross_entropy(model(xa), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        t = loss.detach().double().reshape(1)
        if world > 1:
            dist.all_reduce(t)
        losses.append(float(t) / world)
    return losses


def full_state(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer as a full CPU tensor, names without wrapper prefixes (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu().clone() for k, v in sd.items()}


class OpCounter(TorchDispatchMode):
    """Counts matrix products (``mm``, ``addmm``, ``bmm``): a weight gradient costs one more per linear layer."""

    NAMES = ("aten.mm.default", "aten.addmm.default", "aten.bmm.default")

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in self.NAMES:
            self.n += 1
        return func(*args, **(kwargs or {}))


def count_products(fn) -> int:
    with OpCounter() as c:
        fn()
    return c.n


# ------------------------------------------------------------------------------------------------ rank jobs


def job_train_attack_save(rank: int, world: int, out: str) -> None:
    """FSDP and DDP training from one init; the attack through FSDP; a DCP checkpoint after 3 steps."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

    from advtrain.parallel import save_checkpoint, shard_model_

    out = Path(out)
    res: dict = {}

    # --- the attack through the sharded model: same images, no reduce-scatter, no .grad, input gradients only
    calls = []

    class Counting(DefaultReduceScatter):
        def __call__(self, *a, **k):
            calls.append(1)
            return super().__call__(*a, **k)

    model = shard_model_(make_model(), precision="fp32")
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_custom_reduce_scatter(Counting())
    plain = make_model()
    x, y = global_batch(99)
    res["adv_fsdp"] = attack(model, x, y, steps=3)
    res["adv_plain"] = attack(plain, x, y, steps=3)
    res["rs_calls_attack"] = len(calls)
    res["grads_after_attack"] = sum(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        res["mm_forward"] = count_products(lambda: model(x))
    res["mm_attack"] = count_products(lambda: attack(model, x, y, steps=2))
    model.train()
    res["mm_train"] = count_products(lambda: F.cross_entropy(model(x), y).backward())
    res["rs_calls_train"] = len(calls)
    res["grads_after_train"] = sum(p.grad is not None for p in model.parameters())
    res["n_params"] = sum(1 for _ in model.parameters())

    # --- FSDP training, a checkpoint after 3 steps, 2 more steps
    model = shard_model_(make_model(), precision="fp32")
    ema = shard_model_(make_model(seed=1), precision="fp32")  # a second sharded state to save and restore
    opt = make_optimizer(model)
    res["fsdp_losses"] = train(model, opt, steps=range(3), rank=rank, world=world)
    save_checkpoint(
        out / "ckpt-000000000003",
        model=model,
        optimizer=opt,
        ema=ema,
        extra={"step": 3},
        rank_state={"rank": rank, "pos": 3 * GLOBAL_BATCH // world},
    )
    res["fsdp_losses"] += train(model, opt, steps=range(3, 5), rank=rank, world=world)
    res["fsdp_final"] = full_state(model)
    res["shard_bytes"] = {  # this rank's memory for parameters, gradients and AdamW state
        "params": sum(p.to_local().nbytes for p in model.parameters()),
        "grads": sum(p.grad.to_local().nbytes for p in model.parameters()),
        "optim": sum(v.to_local().nbytes for s in opt.state.values() for k, v in s.items() if k != "step"),
    }

    # --- FSDP with activation checkpointing
    model = shard_model_(make_model(), precision="fp32", activation_checkpointing=True)
    res["fsdp_ac_losses"] = train(model, make_optimizer(model), steps=range(5), rank=rank, world=world)

    # --- FSDP under bf16 mixed precision: computes in bf16 (checked on a block's linear layer)
    model = shard_model_(make_model(), precision="bf16")
    dtypes = []
    model.inner.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: dtypes.append((i[0].dtype, o.dtype)))
    res["fsdp_bf16_losses"] = train(model, make_optimizer(model), steps=range(5), rank=rank, world=world)
    res["bf16_dtypes"] = dtypes[0]
    res["bf16_param_dtype"] = next(model.parameters()).dtype

    # --- DDP from the same init
    ddp = nn.parallel.DistributedDataParallel(make_model())
    opt_ddp = make_optimizer(ddp)
    res["ddp_losses"] = train(ddp, opt_ddp, steps=range(5), rank=rank, world=world)
    res["ddp_final"] = {k.removeprefix("module."): v.detach().clone() for k, v in ddp.state_dict().items()}
    save_checkpoint(out / "ddp" / "ckpt-000000000005", model=ddp, optimizer=opt_ddp)  # DDP: the same format
    torch.save(res, out / f"result-{rank}.pt")


def job_resume(rank: int, world: int, out: str) -> None:
    """Fresh processes resume the checkpoint of :func:`job_train_attack_save` and run its last 2 steps."""
    from advtrain.parallel import latest_checkpoint, load_checkpoint, shard_model_

    out = Path(out)
    model = shard_model_(make_model(seed=5), precision="fp32")  # another init: everything must come from disk
    ema = shard_model_(make_model(seed=6), precision="fp32")
    opt = make_optimizer(model)
    path = latest_checkpoint(out)
    resumed = load_checkpoint(path, model=model, optimizer=opt, ema=ema)
    res = {
        "extra": resumed.extra,
        "rank_state": resumed.rank_state,
        "saved_world": resumed.saved_world,
        "ema": full_state(ema),
    }
    res["losses"] = train(model, opt, steps=range(3, 5), rank=rank, world=world)
    res["final"] = full_state(model)

    # a convnet, sharded per stage
    convnext = shard_model_(make_convnext(), precision="fp32")
    res["convnext_losses"] = train(convnext, make_optimizer(convnext), steps=range(2), rank=rank, world=world)

    # timm's EMA on a sharded model: build it before sharding, shard its module the same way
    res["ema_updated"] = ema_run(rank, world)

    # BatchNorm buffers: per rank until broadcast_buffers_ makes them rank 0's
    from advtrain.parallel import broadcast_buffers_

    bn = nn.BatchNorm1d(3)
    bn(torch.randn(8, 3, generator=torch.Generator().manual_seed(rank)))
    res["bn_before"] = bn.running_mean.clone()
    broadcast_buffers_(bn)
    res["bn_after"] = bn.running_mean.clone()
    torch.save(res, out / f"resume-{rank}.pt")


def ema_run(rank: int = 0, world: int = 1) -> dict[str, Tensor]:
    """Two training steps with timm's ModelEmaV3 (decay 0.9); under a process group both are sharded."""
    from timm.utils import ModelEmaV3

    from advtrain.parallel import shard_model_

    model = make_model()
    ema = ModelEmaV3(model, decay=0.9)
    if world > 1:
        shard_model_(model, precision="fp32")
        shard_model_(ema.module, precision="fp32")
    opt = make_optimizer(model)
    for s in range(2):
        train(model, opt, steps=range(s, s + 1), rank=rank, world=world)
        ema.update(model, step=s)
    return full_state(ema.module) if world > 1 else {k: v.clone() for k, v in ema.module.state_dict().items()}
