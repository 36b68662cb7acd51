"""The loader: every source through one torchdata StatefulDataLoader, one Batch type, per-rank resumable state.

``make_loader`` binds a source to a run (seed, rank, world), puts a :class:`ShardedSampler` in front of a
map-style source, and collates :class:`Sample` s into a :class:`Batch` that carries the bad-sample records of
its samples. ``loader.state_dict()`` is this rank's state: under DDP each rank's differs (its own sampler slice,
its own shards), so a checkpoint stores all of them (:func:`gather_loader_states`) and each rank restores its
own (:func:`load_loader_state`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor
from torchdata.stateful_dataloader import StatefulDataLoader

from advtrain.data._bad import BadSample
from advtrain.data._sources import Sample, ShardSource, _MapSource


class Batch(NamedTuple):
    """A collated batch.

    ``images`` (B, 3, H, W) uint8; ``labels`` (B,) int64 or None (a caption-only source); ``captions`` B strings
    or None; ``keys`` the B sample keys; ``bad`` the bad-sample records of whatever the readers skipped while
    producing these samples (feed them to :class:`advtrain.data.BadSampleBudget`).
    """

    images: Tensor
    labels: Tensor | None
    captions: list[str] | None
    keys: list[str]
    bad: list[BadSample]

    def pin_memory(self) -> Batch:
        """Pinned host tensors (the DataLoader calls this with ``pin_memory=True``)."""
        return self._replace(
            images=self.images.pin_memory(), labels=None if self.labels is None else self.labels.pin_memory()
        )


def collate(samples: list[Sample]) -> Batch:
    """Stacks :class:`Sample` s into a :class:`Batch`; labels (captions) are None unless every sample has one.

    Raises:
        ValueError: the images differ in shape (a transform that does not crop to one size).
    """
    shapes = {tuple(s.image.shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"a batch needs images of one shape; got {sorted(shapes)}: crop them to one size")
    labels = [s.label for s in samples]
    captions = [s.caption for s in samples]
    return Batch(
        images=torch.stack([s.image for s in samples]),
        labels=None if any(y is None for y in labels) else torch.tensor(labels, dtype=torch.int64),
        captions=None if any(c is None for c in captions) else captions,
        keys=[s.key for s in samples],
        bad=[r for s in samples for r in s.bad],
    )


class ShardedSampler(torch.utils.data.Sampler):
    """A seeded per-epoch permutation cut into global batches and dealt to ranks; yields ``(epoch, index)``.

    The permutation (seed, epoch) is cut into global batches of ``world x batch`` and rank ``r`` takes slice
    ``r`` of every global batch, so a step's images across all ranks are exactly the images one process would
    take at that step with the same global batch. Training (``shuffle``, ``drop_last``): only complete global
    batches are dealt (equal counts on every rank keep DDP in lockstep), and the epoch advances after each pass.
    Evaluation (``shuffle=False, drop_last=False``): indices in order, the last global batch dealt as far as it
    goes (ranks may get unequal counts). State: (epoch, position in this rank's list).

    Args:
        n: the source's length.
        seed: the run's seed.
        rank, world: this process and the process count.
        batch: the per-rank batch size.
        shuffle: permute each epoch.
        drop_last: deal only complete global batches.
    """

    def __init__(
        self, n: int, *, seed: int, rank: int, world: int, batch: int, shuffle: bool = True, drop_last: bool = True
    ):
        if n < 1 or batch < 1 or not 0 <= rank < world:
            raise ValueError(
                f"need n >= 1, batch >= 1, 0 <= rank < world; got n={n}, batch={batch}, rank={rank}, world={world}"
            )
        self.n, self.seed, self.rank, self.world, self.batch = n, seed, rank, world, batch
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self.pos = 0, 0

    def indices(self, epoch: int) -> list[int]:
        """This rank's indices in ``epoch``."""
        perm = (
            torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            if self.shuffle
            else torch.arange(self.n)
        )
        g = self.batch * self.world
        full = perm[: self.n // g * g].view(-1, self.world, self.batch)[:, self.rank].reshape(-1).tolist()
        if self.drop_last:
            return full
        rest = perm[self.n // g * g :]
        return full + rest[self.rank * self.batch : (self.rank + 1) * self.batch].tolist()

    def __len__(self) -> int:
        return len(self.indices(self.epoch)) if not self.drop_last else self.n // (self.batch * self.world) * self.batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        idx = self.indices(self.epoch)
        while self.pos < len(idx):
            self.pos += 1
            yield self.epoch, idx[self.pos - 1]
        self.epoch, self.pos = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


class Loader(StatefulDataLoader):
    """torchdata's StatefulDataLoader that remembers its layout (rank, world, workers) and its bound source."""

    rank: int
    world: int


def make_loader(
    source,
    *,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
    num_workers: int = 0,
    train: bool = True,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    multiprocessing_context: str | None = None,
) -> Loader:
    """A resumable loader for any source: map-style through a :class:`ShardedSampler`, streams as they are.

    Args:
        source: a :class:`TensorSource`, :class:`ImageFolderSource` or :class:`ShardSource`.
        batch_size: samples per batch on this rank (the global batch is ``world x batch_size``).
        seed: the run's seed (sampler permutation, shard order, per-sample augmentation).
        rank, world: this process and the process count (``torch.distributed`` rank and world size).
        num_workers: DataLoader worker processes (each decodes and augments its own samples).
        train: map-style: shuffle and keep only complete global batches; False: in order, keep the last batch.
        pin_memory: pin batches for asynchronous host-to-GPU copies.
        prefetch_factor: batches prefetched per worker (torch's default 2).
        multiprocessing_context: ``"fork"``, ``"spawn"`` or ``"forkserver"``; None: the platform default.

    Returns:
        A :class:`Loader` (a ``torchdata.stateful_dataloader.StatefulDataLoader``) yielding :class:`Batch` es.
        Its ``state_dict()`` resumes mid-epoch exactly: same samples, order and augmentation, as long as world,
        ``num_workers`` and ``batch_size`` are unchanged.

    Raises:
        TypeError: an unknown source type.
        ValueError: a bad batch size or rank.
    """
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"batch_size must be >= 1 and num_workers >= 0; got {batch_size}, {num_workers}")
    if not isinstance(source, (_MapSource, ShardSource)):
        raise TypeError(
            f"make_loader takes a TensorSource, ImageFolderSource or ShardSource; got {type(source).__name__}"
        )
    bound = source.bind(seed=seed, rank=rank, world=world)
    extra = {}
    if num_workers:
        extra = {
            "prefetch_factor": prefetch_factor or 2,
            "persistent_workers": False,
            "multiprocessing_context": multiprocessing_context,
        }
    from advtrain.training import quiet_set_vital  # torchdata's deprecation warning on every construction

    with quiet_set_vital():
        loader = _build(
            bound,
            batch_size=batch_size,
            seed=seed,
            rank=rank,
            world=world,
            num_workers=num_workers,
            train=train,
            pin_memory=pin_memory,
            extra=extra,
        )
    loader.rank, loader.world = rank, world
    return loader


def _build(bound, *, batch_size, seed, rank, world, num_workers, train, pin_memory, extra) -> Loader:
    if isinstance(bound, ShardSource):
        return Loader(
            bound, batch_size=batch_size, num_workers=num_workers, collate_fn=collate, pin_memory=pin_memory, **extra
        )
    sampler = ShardedSampler(
        len(bound), seed=seed, rank=rank, world=world, batch=batch_size, shuffle=train, drop_last=train
    )
    return Loader(
        bound,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        drop_last=train,
        **extra,
    )


def loader_state(loader: Loader) -> dict:
    """This rank's loader state with its layout: ``{"rank", "world", "num_workers", "batch_size", "loader"}``."""
    return {
        "rank": loader.rank,
        "world": loader.world,
        "num_workers": loader.num_workers,
        "batch_size": loader.batch_size,
        "loader": loader.state_dict(),
    }


def gather_loader_states(loader: Loader) -> list[dict]:
    """Every rank's :func:`loader_state`, in rank order, on every rank (a collective call under DDP).

    Save the list in the checkpoint (rank 0 writes it); on resume every rank passes it to
    :func:`load_loader_state`. Without an initialized process group (or with world 1) it is ``[loader_state]``.
    """
    import torch.distributed as dist

    mine = loader_state(loader)
    if loader.world == 1 or not (dist.is_available() and dist.is_initialized()):
        if loader.world != 1:
            raise RuntimeError(
                f"the loader is rank {loader.rank} of {loader.world} but no process group is "
                f"initialized: cannot gather the other ranks' states"
            )
        return [mine]
    out: list = [None] * loader.world
    dist.all_gather_object(out, mine)
    return out


def load_loader_state(loader: Loader, states: list[dict] | dict) -> None:
    """Restores this rank's state from :func:`gather_loader_states` output (or one :func:`loader_state`).

    Raises:
        ValueError: the states were saved with another world size, worker count or batch size (resuming exactly
            needs the same layout), or a single state from another rank.
    """
    if isinstance(states, dict):
        states = [states] if "loader" in states else None
    if not isinstance(states, list) or not states:
        raise ValueError("expected the list gather_loader_states returned (or one loader_state dict)")
    if len(states) != loader.world:
        raise ValueError(
            f"{len(states)} saved loader states for a world of {loader.world}: resume with the same number of processes"
        )
    st = states[loader.rank]
    for k, have in (("rank", loader.rank), ("num_workers", loader.num_workers), ("batch_size", loader.batch_size)):
        if st[k] != have:
            raise ValueError(
                f"the saved loader state has {k}={st[k]}, this loader {k}={have}: resume with the same layout"
            )
    loader.load_state_dict(st["loader"])
