"""Shuffle-BN across ranks: 2 CPU processes over gloo (gather, permute, scatter, invert, gradients)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from advtrain.bn import exchange_rows, invert_permutation, shuffle_across_ranks, unshuffle_across_ranks

WORLD = 2
N = 6  # rows per rank


def _all_gather(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _worker(rank: int, init: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120)
    )  # fail, never hang
    try:
        # row r of rank k holds the value 100 k + r: where every row came from is readable
        x = (rank * 100 + torch.arange(N, dtype=torch.float64))[:, None].repeat(1, 3)
        global_x = _all_gather(x)

        # gather, permute, scatter: ranks use different seeds, rank 0's permutation is broadcast
        xs, perm = shuffle_across_ranks(x, generator=torch.Generator().manual_seed(10 + rank))
        assert torch.equal(_all_gather(perm), perm.repeat(WORLD))  # one permutation on every rank
        assert torch.equal(_all_gather(xs), global_x[perm])
        origin = (xs[:, 0] // 100).long()
        assert torch.equal(torch.bincount(origin, minlength=WORLD), torch.full((WORLD,), N // WORLD))
        assert not torch.equal(xs, x)
        # and back
        assert torch.equal(unshuffle_across_ranks(xs, perm), x)
        labels = torch.arange(N) + 10 * rank
        assert torch.equal(exchange_rows(labels, perm), _all_gather(labels)[perm[rank * N : (rank + 1) * N]])

        # twins: this rank's batch is [x; x_adv], rows i and i + N/2 are twins; no rank gets both
        twins = torch.arange(N) % (N // 2)
        xt, _ = shuffle_across_ranks(x, generator=torch.Generator().manual_seed(3), sources=twins)
        ids = [(int(v) // 100, int(v) % 100 % (N // 2)) for v in xt[:, 0]]
        assert len(set(ids)) == N, ids

        # gradients travel back through both exchanges: out_i = x_i^2 (1 + rank that normalized row i)
        xg = x.clone().requires_grad_(True)
        ys, p = shuffle_across_ranks(xg, generator=torch.Generator().manual_seed(5))
        out = unshuffle_across_ranks(ys**2 * (rank + 1), p)
        assert torch.equal(out.detach(), x**2 * (invert_permutation(p)[rank * N : (rank + 1) * N] // N + 1)[:, None])
        out.sum().backward()
        dest = invert_permutation(p)[rank * N : (rank + 1) * N] // N
        torch.testing.assert_close(xg.grad, 2 * x * (dest + 1)[:, None], rtol=0, atol=0)

        # a rank with another batch size is refused on every rank (nobody hangs)
        try:
            shuffle_across_ranks(torch.zeros(N + rank, 3))
        except ValueError as e:
            assert "same number of rows on every rank; got [6, 7]" in str(e)
        else:
            raise AssertionError("unequal batch sizes were accepted")
    finally:
        dist.destroy_process_group()


def test_shuffle_across_two_gloo_ranks(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"),), nprocs=WORLD, join=True)


def test_shuffling_across_ranks_needs_an_initialized_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(RuntimeError, match="torch.distributed to be initialized"):
        shuffle_across_ranks(torch.zeros(2, 3))
