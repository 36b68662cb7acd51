"""Runs a function in several local processes joined by a gloo process group's environment (for DDP tests)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    import torch

    os.environ.update(
        WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    fn(rank, *args)


def spawn_gloo(fn: Callable[..., Any], *args: Any, world: int = 2) -> None:
    """Calls ``fn(rank, *args)`` in ``world`` processes with WORLD_SIZE/RANK/LOCAL_RANK/MASTER_ADDR/PORT set for a
    free port on 127.0.0.1 (``fn`` initializes the process group itself); raises if any process fails."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_entry, args=(world, port, fn, args), nprocs=world, join=True)
