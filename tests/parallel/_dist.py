"""Runs a function on N gloo processes on 127.0.0.1 (CPU), as torchrun would, and waits for them."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from advtrain.training import teardown_distributed


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world: int, port: int, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    fn(rank, world, *args)  # on an error the process exits with it; spawn reports the traceback
    teardown_distributed()  # frees fn's DDP wrappers (reference cycles) before the group goes


def run_ranks(fn, world: int, *args) -> None:
    """``fn(rank, world, *args)`` on ``world`` spawned processes with a gloo process group; raises if one fails.

    ``fn`` must be importable (a module-level function); results travel back through files.
    """
    mp.start_processes(_entry, args=(fn, world, free_port(), args), nprocs=world, join=True, start_method="spawn")
