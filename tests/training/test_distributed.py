"""Per-rank checkpoint state under 2-process gloo: every rank's loader state is saved, each rank gets its own."""

from __future__ import annotations

import pytest
import torch

from tests.gloo import spawn_gloo


class Position:
    def __init__(self, at):
        self.at = at

    def state_dict(self):
        return {"at": self.at}

    def load_state_dict(self, s):
        self.at = s["at"]


def _worker(rank: int, out: str):
    from advtrain.training import (
        all_mean,
        gather_per_rank,
        load_latest_checkpoint,
        restore_training_state,
        save_checkpoint,
        setup_distributed,
        training_state,
    )

    dd = setup_distributed(device="cpu", threads=1)
    model = torch.nn.Linear(2, 2)
    torch.manual_seed(100 + rank)  # each rank's own RNG stream
    state = training_state({"model": model, "loader": Position(10 * rank + 3)}, dd, samples_seen=64)
    expected = torch.rand(1).item()
    if dd.main:
        save_checkpoint(out, state, keep=1)
    torch.distributed.barrier()
    loaded = load_latest_checkpoint(out, lambda m: None)
    mine = Position(None)
    torch.manual_seed(0)
    restore_training_state(loaded, {"model": torch.nn.Linear(2, 2), "loader": mine}, dd)
    got = {
        "at": mine.at,
        "rand": torch.rand(1).item() == expected,
        "mean": all_mean({"x": float(rank)}, dd),
        "gathered": gather_per_rank(rank, dd),
    }
    torch.save(got, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_each_rank_restores_its_own_loader_and_rng_state(tmp_path):
    spawn_gloo(_worker, str(tmp_path))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["at"] == 10 * rank + 3 and got["rand"]  # its own data position and RNG stream
        assert got["mean"] == {"x": 0.5} and got["gathered"] == [0, 1]
    state = torch.load(next((tmp_path / "checkpoints").glob("*.pt")), weights_only=True)
    assert state["world_size"] == 2 and [r["loader"]["at"] for r in state["ranks"]] == [3, 13]
