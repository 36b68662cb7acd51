"""Exact mid-epoch resume for every source (0 and 2 workers), global batches across ranks, and a 2-process
gloo run over shards of unequal sizes where every rank saves and restores its own loader state."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import pytest
import torch

from advtrain.data import (
    ImageFolderSource,
    ShardedSampler,
    ShardSource,
    TensorSource,
    gather_loader_states,
    load_loader_state,
    make_loader,
    train_transform,
)
from tests.data.shardkit import keyed, write_shards

T32 = train_transform(size=32, scale=(0.2, 1.0), randaugment="rand-m9-mstd0.5-inc1")


def take(loader, n: int) -> list:
    """``n`` batches, starting new epochs of a map-style loader as needed (as a training loop does)."""
    out = []
    while len(out) < n:
        for b in loader:
            out.append(b)
            if len(out) == n:
                return out
    return out


def checkpointed(states):
    """A round trip through torch.save / torch.load(weights_only=True), as a checkpoint does."""
    buf = io.BytesIO()
    torch.save(states, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def same(a: list, b: list) -> None:
    assert [x.keys for x in a] == [x.keys for x in b]
    for x, y in zip(a, b):
        assert torch.equal(x.images, y.images), x.keys  # same crops, flips and RandAugment ops
        assert (x.labels is None and y.labels is None) or torch.equal(x.labels, y.labels)
        assert x.bad == y.bad


def _source(kind: str, tmp_path: Path, real_samples: list[dict]):
    match kind:
        case "tensors":
            import numpy as np
            from PIL import Image

            imgs = [
                np.array(Image.open(io.BytesIO(s["jpg"])).convert("RGB").resize((40, 30))) for s in real_samples[:26]
            ]
            x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
            return TensorSource(x, torch.tensor([int(s["cls"]) for s in real_samples[:26]]), transform=T32)
        case "folder":
            for i, s in enumerate(real_samples[:26]):
                d = tmp_path / "folder" / f"c{int(s['cls'])}"
                d.mkdir(parents=True, exist_ok=True)
                (d / f"{i:03d}.jpg").write_bytes(s["jpg"])
            (tmp_path / "folder" / "c0" / "bad.jpg").write_bytes(b"\xff\xd8 broken")  # a replaced sample
            return ImageFolderSource(tmp_path / "folder", transform=T32)
        case "shards":
            samples = keyed(real_samples[:40], "s")
            samples.insert(13, {"__key__": "broken", "jpg": b"garbage", "cls": b"1"})  # a skipped sample
            urls = write_shards(tmp_path / "shards", samples, [9, 4, 13, 6, 9])
            return ShardSource(urls, transform=T32, num_classes=10, shuffle_buffer=5)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["tensors", "folder", "shards"])
@pytest.mark.parametrize("workers,stop", [(0, 6), (0, 9), (2, 9)])
def test_a_stopped_and_resumed_run_sees_exactly_the_uninterrupted_samples(tmp_path, real_samples, kind, workers, stop):
    """14 batches of 4 uninterrupted vs ``stop`` batches, checkpoint, a fresh loader, the remaining batches.

    Map-style sources hold 26 samples (6 batches an epoch): stop 6 is the epoch boundary, 9 mid-epoch; the
    stream's shards (41 samples, one broken) are dealt to the workers, shuffled in a buffer of 5.
    """
    src = _source(kind, tmp_path, real_samples)
    kw = {"batch_size": 4, "seed": 11, "num_workers": workers}
    full = take(make_loader(src, **kw), 14)
    first_loader = make_loader(src, **kw)
    first = take(first_loader, stop)
    states = checkpointed(gather_loader_states(first_loader))
    del first_loader
    resumed = make_loader(src, **kw)
    load_loader_state(resumed, states)
    same(full, first + take(resumed, 14 - stop))
    if kind == "shards":
        assert any(b.bad for b in full)  # the broken sample was met, and counted once in both runs


def test_a_stream_resumed_right_after_its_epochs_last_sample_goes_on(tmp_path, real_samples):
    """A state saved after the last sample of an epoch resumes with the next epoch (the replayed tail of the
    epoch yields nothing: that is no reason to call the shards unusable)."""
    urls = write_shards(tmp_path / "shards", keyed(real_samples[:16], "e"), [8, 8])
    src = ShardSource(urls, transform=T32, num_classes=10, shuffle_buffer=4)
    kw = {"batch_size": 4, "seed": 5}
    full = take(make_loader(src, **kw), 6)
    first_loader = make_loader(src, **kw)
    first = take(first_loader, 4)  # exactly one epoch of 16
    resumed = make_loader(src, **kw)
    load_loader_state(resumed, checkpointed(gather_loader_states(first_loader)))
    same(full, first + take(resumed, 2))


@pytest.mark.parametrize("kind", ["tensors", "folder"])
def test_map_style_augmentation_does_not_depend_on_the_worker_count(tmp_path, real_samples, kind):
    src = _source(kind, tmp_path, real_samples)
    same(
        take(make_loader(src, batch_size=4, seed=3), 4), take(make_loader(src, batch_size=4, seed=3, num_workers=2), 4)
    )


def test_resume_refuses_another_layout(tmp_path, real_samples):
    src = _source("tensors", tmp_path, real_samples)
    loader = make_loader(src, batch_size=4, seed=0)
    take(loader, 2)
    states = gather_loader_states(loader)
    with pytest.raises(ValueError, match="batch_size=4"):
        load_loader_state(make_loader(src, batch_size=2, seed=0), states)
    with pytest.raises(ValueError, match="num_workers"):
        load_loader_state(make_loader(src, batch_size=4, seed=0, num_workers=1), states)
    with pytest.raises(ValueError, match="world of 2"):
        load_loader_state(make_loader(src, batch_size=4, seed=0, rank=1, world=2), states)


@pytest.mark.parametrize("world", [2, 4])
def test_a_steps_images_across_ranks_are_one_processs_global_batch(world):
    n, per_rank = 50, 3
    one = list(ShardedSampler(n, seed=4, rank=0, world=1, batch=per_rank * world))
    ranks = [list(ShardedSampler(n, seed=4, rank=r, world=world, batch=per_rank)) for r in range(world)]
    assert len({len(r) for r in ranks}) == 1  # equal counts: DDP stays in lockstep
    for step in range(len(ranks[0]) // per_rank):
        together = [k for r in ranks for k in r[step * per_rank : (step + 1) * per_rank]]
        assert together == one[step * per_rank * world : (step + 1) * per_rank * world]
    ev = [
        ShardedSampler(n, seed=4, rank=r, world=world, batch=per_rank, shuffle=False, drop_last=False)
        for r in range(world)
    ]
    assert sorted(i for s in ev for _, i in s) == list(range(n))  # evaluation covers every sample once


# ------------------------------------------------------------------------------------------------ two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, urls: list[str], out: str, workers: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        src = ShardSource(urls, transform=train_transform(size=16), shuffle_buffer=4)
        kw = {"batch_size": 3, "seed": 5, "rank": rank, "world": world, "num_workers": workers}
        n, stop = 10, 4
        full = take(make_loader(src, **kw), n)
        loader = make_loader(src, **kw)
        first = take(loader, stop)
        states = gather_loader_states(loader)  # collective: every rank's state
        ckpt = Path(out) / "loader.pt"
        if rank == 0:
            torch.save(states, ckpt)
        dist.barrier()
        resumed = make_loader(src, **kw)
        load_loader_state(resumed, torch.load(ckpt, weights_only=True))
        rest = take(resumed, n - stop)
        # what the old code did: every rank restoring rank 0's state
        wrong = make_loader(src, **kw)
        wrong.load_state_dict(states[0]["loader"])
        with_rank0 = take(wrong, n - stop)
        result = {
            "full": [k for b in full for k in b.keys],
            "resumed": [k for b in first + rest for k in b.keys],
            "with_rank0_state": [k for b in first + with_rank0 for k in b.keys],
            "images_equal": all(torch.equal(a.images, b.images) for a, b in zip(full, first + rest)),
            "states_differ": states[0] != states[1],
        }
        # the bad-sample budget summed over ranks: both ranks raise the same error together
        from advtrain.data import BadSample, BadSampleBudget, BadSampleError

        budget = BadSampleBudget(max_fraction=0.1, min_samples=10)
        bad = [BadSample("decode", f"shard-of-rank-{rank}", "k", "x")] * (3 if rank == 0 else 0)
        budget.update(bad, good=10, check=False)
        if rank == 1:
            budget.check()  # rank 1 alone read no bad sample: within budget
        try:
            budget.check(across_ranks=True)  # 3 of 23: 13% > 10%
            result["budget_error"] = None
        except BadSampleError as err:
            result["budget_error"] = str(err)
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_with_unequal_shards_resume_each_its_own_stream(tmp_path, real_samples):
    """Two processes (forked: a spawned one re-imports torch, ~10 s here), each with one loader worker."""
    import torch.multiprocessing as mp

    # unequal shard sizes: the ranks' streams advance through shards at different rates
    urls = write_shards(tmp_path / "shards", keyed(real_samples[:44], "u"), [11, 3, 7, 2, 13, 8])
    mp.start_processes(
        _rank_main, args=(2, _free_port(), urls, str(tmp_path), 1), nprocs=2, join=True, start_method="fork"
    )
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["resumed"] == r["full"] and r["images_equal"]
        assert len(r["full"]) == 30
    assert results[0]["states_differ"]
    assert not set(results[0]["full"][:9]) & set(results[1]["full"][:9])  # different shards per rank
    assert results[1]["with_rank0_state"] != results[1]["full"]  # restoring rank 0's state on rank 1 is wrong
    assert results[0]["budget_error"] == results[1]["budget_error"]
    assert "3 of 23 samples" in results[1]["budget_error"] and "shard-of-rank-0" in results[1]["budget_error"]
