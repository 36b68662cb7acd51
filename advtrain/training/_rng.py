"""Randomness for exact resume: per-step generators, stable seeds, and the global RNG states a checkpoint holds."""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def step_generator(seed: int, step: int, salt: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator for one step's randomness: a pure function of (seed, step, salt), so resume is exact.

    Example:
        >>> a, b = step_generator(0, 5, 1), step_generator(0, 5, 1)
        >>> torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))
        True
    """
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7_919 + salt) % (2**63 - 1))
    return g


def stable_seed(*parts: Any) -> int:
    """A seed in ``[0, 2**31)`` from any printable parts, the same in every process (``hash(str)`` is salted).

    Example:
        >>> stable_seed(0, "train", 3) == stable_seed(0, "train", 3) != stable_seed(0, "train", 4)
        True
    """
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") & 0x7FFFFFFF


@contextlib.contextmanager
def seeded_host_rng(seed: int) -> Iterator[None]:
    """Seeds Python's and NumPy's global RNGs for the block, then restores them.

    For libraries that draw from the global RNGs (timm's RandAugment and MixUp, imagecorruptions).

    Example:
        >>> with seeded_host_rng(1):
        ...     a = random.random()
        >>> with seeded_host_rng(1):
        ...     b = random.random()
        >>> a == b
        True
    """
    py, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)


def rng_state() -> dict:
    """The global RNG states (torch CPU, every CUDA device, Python, NumPy) as tensors and plain lists.

    Everything in it loads under ``torch.load(..., weights_only=True)``.
    """
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restores what :func:`rng_state` returned.

    Example:
        >>> s = rng_state(); a = torch.rand(2); set_rng_state(s); torch.equal(a, torch.rand(2))
        True
    """
    torch.set_rng_state(state["torch"])
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
