"""Under DDP only the last backward of a Fast AdvProp step all-reduces: 2 CPU processes over gloo."""

from __future__ import annotations

import copy
import gc
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from advtrain import cross_entropy
from advtrain.bn import bn_route, convert_split_bn_
from advtrain.recycle import maybe_no_sync, recycled_step, sync_update_speed_
from tests.helpers import tiny_cnn

WORLD = 2
EPS = 0.03


def _fast_advprop_grads(model, xc, yc, xa, ya, noise, *, sync_every_pass: bool) -> None:
    """Clean pass, recycled noisy pass, adversarial pass; only the last one synchronizes unless told otherwise."""
    with maybe_no_sync(model, enabled=not sync_every_pass), bn_route(model, "clean"):
        cross_entropy(model(xc), yc, reduction="sum").backward()
    with maybe_no_sync(model, enabled=not sync_every_pass), bn_route(model, "adv"):
        step = recycled_step(model, xa, ya, noise, beta=0.5)
    x_adv = xa + (noise + EPS * step.grad.sign()).clamp(-EPS, EPS)
    with bn_route(model, "adv"):
        cross_entropy(model(x_adv), ya, reduction="sum").backward()
    sync_update_speed_(model, n_clean=xc.shape[0], n_aux=0.5 * xa.shape[0] + xa.shape[0])


def _worker(rank: int, init: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120)
    )  # fail, never hang
    try:
        model = convert_split_bn_(tiny_cnn(seed=0)).double().train()
        local = copy.deepcopy(model)
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        xc, yc = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (4,), generator=g)
        xa, ya = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (4,), generator=g)
        noise = (torch.rand(xa.shape, generator=g, dtype=torch.float64) * 2 - 1) * EPS

        counts = {}
        for sync_every_pass in (False, True):
            ddp = DDP(copy.deepcopy(model), find_unused_parameters=True)
            calls = []

            def counting_hook(state, bucket, calls=calls):
                calls.append(bucket.index())
                return allreduce_hook(state, bucket)

            ddp.register_comm_hook(None, counting_hook)
            _fast_advprop_grads(ddp, xc, yc, xa, ya, noise, sync_every_pass=sync_every_pass)
            counts[sync_every_pass] = len(calls)
            grads = [p.grad.clone() for p in ddp.module.parameters()]

            # reference: the same passes without DDP, then the mean over ranks by hand
            ref = copy.deepcopy(local)
            _fast_advprop_grads(ref, xc, yc, xa, ya, noise, sync_every_pass=True)
            for mine, p in zip(grads, ref.parameters()):
                expected = p.grad.clone()
                dist.all_reduce(expected)
                torch.testing.assert_close(mine, expected / WORLD, rtol=1e-12, atol=1e-13)
            assert any((gr != 0).any() for gr in grads)

            del ddp  # the reducer must go before the process group it talks to (else gloo can abort at exit)
            gc.collect()

        # one all-reduce per bucket for the whole step, instead of one per pass
        assert counts[False] >= 1 and counts[True] == 3 * counts[False], counts
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_only_the_last_backward_of_a_step_all_reduces(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"),), nprocs=WORLD, join=True)
