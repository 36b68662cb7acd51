"""Scale-out: FSDP2 sharding per block, activation checkpointing, sharded (DCP) checkpoints, a memory model.

The recipes call, in this order: build the model (and an EMA copy), :func:`check_fsdp_compatible`,
:func:`shard_model_` (``fully_shard`` on each block, then the root; bf16 ``MixedPrecisionPolicy`` under
``precision="bf16"``; optional :func:`checkpoint_blocks_`), the optimizer over the sharded parameters, then
:func:`latest_checkpoint` / :func:`load_checkpoint`. Attacks run through the sharded model as it is: their
``torch.autograd.grad`` w.r.t. the input computes no weight gradient, so FSDP reduce-scatters nothing.
:func:`save_checkpoint` writes an atomic DCP directory from every rank; ``python -m
advtrain.parallel.consolidate`` turns one into a plain timm state dict. :func:`estimate_memory` gives the
per-GPU bytes of a configuration. The recipes reach all of it through :class:`ParallelModel` (``run.parallel``,
``run.activation_checkpointing``), :func:`save_run_checkpoint`, :func:`resume_run` / :func:`restore_run` and
:func:`check_parallel_options`.
"""

from advtrain.parallel._checkpoint import (
    Resumed,
    consolidate,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from advtrain.parallel._fsdp import (
    broadcast_buffers_,
    check_fsdp_compatible,
    checkpoint_blocks_,
    find_blocks,
    is_sharded,
    mixed_precision_policy,
    shard_model_,
    unwrap,
)
from advtrain.parallel._memory import MemoryEstimate, estimate_memory, format_memory_estimate, vit_block_bytes_per_token
from advtrain.parallel._run import ParallelModel, check_parallel_options, restore_run, resume_run, save_run_checkpoint

__all__ = [
    "MemoryEstimate",
    "ParallelModel",
    "Resumed",
    "broadcast_buffers_",
    "check_parallel_options",
    "check_fsdp_compatible",
    "checkpoint_blocks_",
    "consolidate",
    "estimate_memory",
    "find_blocks",
    "format_memory_estimate",
    "is_sharded",
    "latest_checkpoint",
    "load_checkpoint",
    "mixed_precision_policy",
    "prune_checkpoints",
    "restore_run",
    "resume_run",
    "save_checkpoint",
    "save_run_checkpoint",
    "shard_model_",
    "unwrap",
    "verify_checkpoint",
    "vit_block_bytes_per_token",
]
