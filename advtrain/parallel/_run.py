"""The recipes' glue for ``run.parallel``: prepare the model (DDP or FSDP), save and resume the run checkpoint."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from advtrain.parallel._checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from advtrain.parallel._fsdp import check_fsdp_compatible, checkpoint_blocks_, find_blocks, shard_model_

Parallel = Literal["ddp", "fsdp"]
PER_RANK = ("loader", "budget")


def check_parallel_options(
    parallel: str, *, activation_checkpointing: bool, split_bn: bool, recycling: bool, compile: bool
) -> None:
    """Config-time check of ``run.parallel`` against what the recipe does; raises a one-line ``ValueError``.

    Under ``"fsdp"``: split (auxiliary) BatchNorm, gradient recycling and ``torch.compile`` are refused (see
    :func:`check_fsdp_compatible`, which checks the built model). ``activation_checkpointing`` works with both.

    Found by trying (2 gloo processes, 2026-12-02): one Fast AdvProp step (split-BN ResNet, two recycled
    backwards accumulating into the sharded ``.grad``, ``scale_grads_`` / ``sync_update_speed_`` on the DTensor
    gradients, SGD) under ``fully_shard`` gives the DDP step's weights to 3e-8; but FSDP leaves the BatchNorm
    running statistics per rank (DDP broadcasts them), reduce-scatters after every recycled backward (DDP's
    ``no_sync`` does not apply), and neither the recipe's buffer synchronization nor its multi-step training and
    checkpoints are wired or tested under FSDP, so the recipes refuse it.

    Example:
        >>> check_parallel_options("fsdp", activation_checkpointing=True, split_bn=False, recycling=False,
        ...                        compile=False)
        >>> check_parallel_options("fsdp", activation_checkpointing=False, split_bn=True, recycling=True,
        ...                        compile=False)
        Traceback (most recent call last):
        ...
        ValueError: split BatchNorm and gradient recycling need run.parallel=ddp (not supported under run.parallel=fsdp)
    """
    if parallel not in ("ddp", "fsdp"):
        raise ValueError(f"run.parallel must be 'ddp' or 'fsdp'; got {parallel!r}")
    if not isinstance(activation_checkpointing, bool):
        raise ValueError(f"run.activation_checkpointing must be a bool; got {activation_checkpointing!r}")
    if parallel != "fsdp":
        return
    what = [n for n, on in (("split BatchNorm", split_bn), ("gradient recycling", recycling)) if on]
    if what:
        raise ValueError(f"{' and '.join(what)} need run.parallel=ddp (not supported under run.parallel=fsdp)")
    if compile:
        raise ValueError("run.compile=true needs run.parallel=ddp (torch.compile with FSDP is not supported yet)")


def _single_process_group(device: torch.device) -> None:
    """FSDP needs a process group: one of world size 1 (an in-memory store) when none was started."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


class ParallelModel:
    r"""A recipe's model prepared for ``run.parallel``: the training view, the attack's model, the EMA, eval copies.

    ``"ddp"``: optional :func:`checkpoint_blocks_`, then ``DistributedDataParallel`` when the world has more than
    one process (``model`` is the wrapper, ``raw`` the module). ``"fsdp"``: :func:`check_fsdp_compatible`, then
    :func:`shard_model_` (bf16 ``MixedPrecisionPolicy`` under ``precision="bf16"``, optional activation
    checkpointing); ``model`` and ``raw`` are the same sharded module. In both modes an EMA
    (``timm.utils.ModelEmaV3``) is copied from the model *before* any wrapping or sharding; under FSDP it is sharded
    like the model (fp32), so that its update is a local lerp of shards.

    Attacks: give them ``raw``. Under FSDP that is the sharded model itself: an attack's
    ``torch.autograd.grad(loss, x)`` computes the input gradient only (no weight gradient, no ``AccumulateGrad``,
    nothing reduce-scattered; ``.grad`` stays ``None``).

    Evaluation: :meth:`for_eval` returns a plain module with the full weights. Under DDP that is ``raw`` (or the
    EMA's module). Under FSDP it is an unsharded fp32 copy on this rank's device, filled from the shards (one
    all-gather): every rank can then attack its share of the validation set with no collective inside the
    forward (ranks attack different numbers of samples, AutoAttack's passes depend on the data). The copy costs
    :math:`4P` bytes of host memory (a CPU template kept from before sharding) and, between :meth:`for_eval` and
    :meth:`train`, of device memory.

    Args:
        raw: the built model, on ``device``.
        parallel: ``"ddp"`` or ``"fsdp"``.
        precision: ``"fp32"`` or ``"bf16"`` (FSDP's mixed-precision policy; DDP runs autocast in the recipe).
        activation_checkpointing: checkpoint every block (:func:`checkpoint_blocks_`).
        dd: this process (:class:`advtrain.training.Dist`: ``world``, ``device``, ``local_rank``); FSDP needs a
            process group, also for a world of one.
        ema_decay: make an EMA with this decay (``None``: none).
        recycling: the recipe recycles gradients (refused under FSDP).
        compile: the recipe compiles the model (refused under FSDP).
        find_unused_parameters: passed to DDP.

    Raises:
        ValueError: what :func:`check_fsdp_compatible` refuses; an unknown ``parallel``.

    Example:
        >>> from advtrain.training import Dist
        >>> pm = ParallelModel(torch.nn.Linear(2, 2), Dist(), parallel="ddp", precision="fp32",
        ...                    activation_checkpointing=False)
        >>> pm.model is pm.raw, pm.ema, pm.sharded
        (True, None, False)
    """

    def __init__(
        self,
        raw: nn.Module,
        dd,
        *,
        parallel: Parallel,
        precision: str,
        activation_checkpointing: bool,
        ema_decay: float | None = None,
        recycling: bool = False,
        compile: bool = False,
        find_unused_parameters: bool = False,
    ):
        if parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be 'ddp' or 'fsdp'; got {parallel!r}")
        self.parallel, self.device, self.sharded = parallel, dd.device, parallel == "fsdp"
        self.ema = None
        if ema_decay:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(raw, decay=ema_decay)
        self.raw = raw
        self._template: nn.Module | None = None
        self._ema_template: nn.Module | None = None
        self._on_device: nn.Module | None = None
        if self.sharded:
            check_fsdp_compatible(raw, recycling=recycling, compile=compile)
            _single_process_group(dd.device)
            self._template = copy.deepcopy(raw).cpu()
            shard_model_(raw, precision=precision, activation_checkpointing=activation_checkpointing)
            if self.ema is not None:
                self._ema_template = copy.deepcopy(self.ema.module).cpu()
                shard_model_(self.ema.module, precision="fp32", blocks=find_blocks(self.ema.module))
            self.model = raw
            return
        if activation_checkpointing:
            checkpoint_blocks_(raw)
        if dd.world > 1:
            ids = [dd.local_rank] if dd.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(
                raw, device_ids=ids, find_unused_parameters=find_unused_parameters
            )
        else:
            self.model = raw

    def full_state_dict(self, *, ema: bool = False) -> dict[str, torch.Tensor]:
        """The full (unsharded) state dict of the model or the EMA's module, on the CPU, on every rank.

        A collective under FSDP (every rank calls it). Keys are the unwrapped module's (checkpoint-wrapper
        prefixes removed).
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        module = self.ema.module if ema else self.raw
        if not self.sharded:
            return {k: v.detach().cpu() for k, v in module.state_dict().items()}  # wrapper prefixes stripped
        sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
        return {k: v.detach().cpu() for k, v in sd.items()}

    def for_eval(self, *, ema: bool = False) -> nn.Module:
        """A plain module with the full weights (of the EMA with ``ema=True``) for evaluation; see the class.

        Under FSDP a collective (every rank calls it); the copy stays on the device until :meth:`train`.
        """
        if ema and self.ema is None:
            raise ValueError("for_eval(ema=True) without an EMA (ema_decay was None)")
        if not self.sharded:
            return self.ema.module if ema else self.raw
        template = self._ema_template if ema else self._template
        template.load_state_dict(self.full_state_dict(ema=ema))
        self._on_device = template.to(self.device).eval()
        return self._on_device

    def train(self) -> None:
        """Back to training: ``raw.train()``; under FSDP the evaluation copy returns to the host."""
        if self._on_device is not None:
            self._on_device.cpu()
            self._on_device = None
        self.raw.train()


def _checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_run_checkpoint(
    run_dir: str | Path,
    objects: dict[str, Any],
    dd,
    *,
    pm: ParallelModel,
    keep: int,
    per_rank: tuple[str, ...] = PER_RANK,
    **extra: Any,
) -> Path | None:
    """Writes the run's checkpoint: a toolkit ``.pt`` file under DDP, an atomic DCP directory under FSDP.

    ``objects`` holds ``model``, ``optim``, ``ema`` and the per-rank objects (``loader``, ``budget``); ``extra``
    the plain values (``samples_seen`` names the checkpoint). DDP: :func:`advtrain.training.training_state` and
    :func:`advtrain.training.save_checkpoint` (rank 0 writes, every rank's loader and RNG state gathered).
    FSDP: :func:`advtrain.parallel.save_checkpoint` into ``checkpoints/ckpt-<samples, 12 digits>/`` (every rank
    writes its shards and its own loader, budget and RNG state), then all but the newest ``keep`` complete
    directories are pruned. A collective: every rank calls it.

    Args:
        run_dir: the run directory.
        objects: name -> object with ``state_dict()`` (``None`` values left out).
        dd: this process (:class:`advtrain.training.Dist`).
        pm: the :class:`ParallelModel`.
        keep: how many checkpoints to keep.
        per_rank: the names whose state differs between ranks.
        **extra: plain values (``samples_seen``, ``step``, ...).

    Returns:
        The path written (DDP: on rank 0; ``None`` on the others).
    """
    from advtrain.training import save_checkpoint as save_pt
    from advtrain.training import training_state
    from advtrain.training._rng import rng_state

    if not pm.sharded:
        st = training_state(objects, dd, per_rank=per_rank, **extra)
        return save_pt(run_dir, st, keep=keep) if dd.main else None
    own = {k: o.state_dict() for k, o in objects.items() if o is not None and k in per_rank} | {"rng": rng_state()}
    path = _checkpoint_dir(run_dir) / f"ckpt-{extra['samples_seen']:012d}"
    ema = objects.get("ema")
    save_checkpoint(
        path,
        model=objects["model"],
        optimizer=objects.get("optim"),
        ema=ema.module if ema is not None else None,
        extra=dict(extra) | {"world_size": dd.world},
        rank_state=own,
    )
    prune_checkpoints(_checkpoint_dir(run_dir), keep=keep)
    return path


def resume_run(run, objects: dict[str, Any], dd, *, pm: ParallelModel, log: Callable[[str], None]) -> dict | None:
    """Finds the newest usable run checkpoint; returns its plain values (``None``: a new run).

    DDP: :meth:`advtrain.training.RunDir.resume` (reads the file; :func:`restore_run` applies it). FSDP:
    :func:`latest_checkpoint` (an incomplete or corrupt directory is reported and skipped), then
    :func:`load_checkpoint` of ``objects``' ``model``, ``optim`` and ``ema`` at once (any saved world size: DCP
    reshards); the per-rank state waits in the result for :func:`restore_run`. The metrics file is cut back to
    the checkpoint, and a run directory with metrics but no usable checkpoint is refused, as under DDP. A
    collective: every rank calls it.

    Args:
        run: the :class:`advtrain.training.RunDir`.
        objects: ``model``, ``optim``, ``ema`` (built, and sharded under FSDP); other entries are ignored here.
        dd: this process.
        pm: the :class:`ParallelModel`.
        log: rank 0's logger.

    Raises:
        advtrain.training.RunDirError: metrics exist but no usable checkpoint.
    """
    from advtrain.training import RunDirError, truncate_metrics

    if not pm.sharded:
        return run.resume()
    path = latest_checkpoint(_checkpoint_dir(run.path), log=log)
    if path is None:
        metrics = run.metrics_path
        if metrics.exists() and metrics.stat().st_size:
            raise RunDirError(
                f"{run.path} holds {metrics.name} but no usable checkpoint to resume from; start over with "
                f"--fresh (run.fresh=true: the old files are moved aside) or use another run.out_dir"
            )
        return None
    ema = objects.get("ema")
    r = load_checkpoint(
        path, model=objects["model"], optimizer=objects.get("optim"), ema=ema.module if ema is not None else None
    )
    state = dict(r.extra) | {"_rank_state": r.rank_state, "_saved_world": r.saved_world}
    log(f"resuming from {path} ({state['samples_seen']} samples seen)")
    if dd.main:
        truncate_metrics(run.metrics_path, state["samples_seen"], log=log)
    return state


def restore_run(
    state: dict,
    objects: dict[str, Any],
    dd,
    *,
    pm: ParallelModel,
    log: Callable[[str], None],
    per_rank: tuple[str, ...] = PER_RANK,
) -> None:
    """Applies what :func:`resume_run` found: under DDP everything, under FSDP this rank's per-rank state.

    DDP: :func:`advtrain.training.restore_training_state` (a checkpoint of another world size is refused
    there, with a message). FSDP: this rank's loader, budget and RNG state when the checkpoint was written by
    as many ranks; otherwise they cannot be restored, which one logged line says, and the run continues at the
    samples seen with fresh per-rank state (each loader starts its sample stream again).

    Raises:
        advtrain.training.ResumeError: (DDP) a checkpoint of another world size.
    """
    from advtrain.training import restore_training_state
    from advtrain.training._rng import set_rng_state

    if not pm.sharded:
        restore_training_state(state, objects, dd, per_rank=per_rank)
        return
    own = state.get("_rank_state")
    if own is None:
        log(
            f"the checkpoint was written by {state['_saved_world']} process(es) and this run has {dd.world}: "
            f"the per-rank data-loader positions and RNG states cannot be restored; continuing at "
            f"{state['samples_seen']} samples seen with fresh loaders and RNG states"
        )
        return
    for name in per_rank:
        if objects.get(name) is not None:
            objects[name].load_state_dict(own[name])
    set_rng_state(own["rng"])
