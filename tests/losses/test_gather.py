"""Global-batch negatives across ranks: 2 gloo processes against one process holding the global batch.

The contrastive loss with ``gather=True`` on 2 ranks (DDP averaging the gradients) must give the loss and the model
gradient of one process with all 2 x 4 pairs; the attack's loss with the other rank's captions as negatives must
give each local image its row of the global batch; and the attack must need no collective (ranks running a
different number of attack steps finish).
"""

from __future__ import annotations

import datetime
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advtrain import pgd
from advtrain.losses import clip_contrastive_loss, contrastive_attack_loss, gather_features, gather_other_ranks
from advtrain.losses._gather import scale_grad
from advtrain.training import teardown_distributed
from tests.gloo import spawn_gloo

WORLD, B, D = 2, 4, 8
TOL = 1e-6  # float32, relative: |difference| <= TOL * (1 + max |reference value|); the test prints the differences


class ImageModel(nn.Module):
    """A linear image tower to the text dimension and CLIP's learnable temperature."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Sequential(nn.Flatten(), nn.Linear(12, D))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, x):
        return self.proj(x)


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(WORLD * B, 3, 2, 2, generator=g), torch.randn(WORLD * B, D, generator=g)


def _model() -> ImageModel:
    torch.manual_seed(0)
    return ImageModel()


def _grads(model: nn.Module) -> dict[str, list]:
    return {k: p.grad.flatten().tolist() for k, p in model.named_parameters()}


def _rank_row(rank: int, gather: bool) -> dict:
    x, t = _data()
    xl, tl = x[rank * B : (rank + 1) * B], t[rank * B : (rank + 1) * B]
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    loss = clip_contrastive_loss(ddp(xl), tl, logit_scale=model.logit_scale, gather=gather)
    loss.backward()
    others = gather_other_ranks(tl)
    attack = contrastive_attack_loss(logit_scale=model.logit_scale, text_negatives=others)(model(xl).detach(), tl)
    return {"loss": loss.item(), "grads": _grads(model), "attack": attack.tolist(), "others": others.tolist()}


def _worker(rank: int, out: str, gather: bool) -> None:
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    row = _rank_row(rank, gather)  # the DDP wrapper is unreachable from here on: teardown collects it
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(row, f)
    teardown_distributed()


def _reference():
    """One process, the global batch: the loss, the gradient, and the attack's per-sample losses by definition."""
    x, t = _data()
    model = _model()
    f = model(x)
    loss = clip_contrastive_loss(f, t, logit_scale=model.logit_scale)
    loss.backward()
    s = model.logit_scale.detach().exp()
    z = s * F.normalize(f.detach(), dim=1) @ F.normalize(t, dim=1).T  # (N, N) logits of the global batch
    attack = []
    for r in range(WORLD):
        rows = slice(r * B, (r + 1) * B)
        zl = z[rows, rows]  # local images x local captions
        to_texts = z[rows].logsumexp(1) - zl.diagonal()  # each local image against all N captions
        to_images = zl.logsumexp(0) - zl.diagonal()  # each local caption against the B local images
        attack.append((0.5 * (to_texts + to_images)).tolist())
    return float(loss.detach()), _grads(model), attack


def _max_diff(a, b) -> float:
    return float((torch.tensor(a) - torch.tensor(b)).abs().max())


@pytest.mark.slow
def test_two_gloo_ranks_with_gather_match_one_process_holding_the_global_batch(tmp_path, capsys):
    spawn_gloo(_worker, str(tmp_path), True, world=WORLD)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    loss, grads, attack = _reference()
    diffs = {
        "loss": max(abs(r["loss"] - loss) for r in ranks),
        **{f"grad {k}": max(_max_diff(r["grads"][k], grads[k]) for r in ranks) for k in grads},
        "attack loss": max(_max_diff(ranks[r]["attack"], attack[r]) for r in range(WORLD)),
    }
    with capsys.disabled():
        print("\nmax |2 ranks - 1 process|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    scale = {"loss": abs(loss), **{f"grad {k}": max(map(abs, v)) for k, v in grads.items()}}
    scale["attack loss"] = max(abs(v) for row in attack for v in row)
    assert all(diffs[k] <= TOL * (1 + scale[k]) for k in diffs), (diffs, scale)
    _, t = _data()
    assert torch.equal(torch.tensor(ranks[0]["others"]), t[B:]) and torch.equal(torch.tensor(ranks[1]["others"]), t[:B])
    assert all(grads[k] != [0.0] * len(grads[k]) for k in grads)  # every parameter has a gradient to compare


@pytest.mark.slow
def test_without_gather_the_per_rank_negatives_give_another_loss_and_gradient(tmp_path):
    """The check above can fail: the per-rank batch (the old behaviour) is measurably different."""
    spawn_gloo(_worker, str(tmp_path), False, world=WORLD)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    loss, grads, _ = _reference()
    assert abs(ranks[0]["loss"] - loss) > 1e-3
    assert _max_diff(ranks[0]["grads"]["proj.1.weight"], grads["proj.1.weight"]) > 1e-3


def _uneven_attack_worker(rank: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
    x, t = _data()
    xl, tl = x[rank * B : (rank + 1) * B], t[rank * B : (rank + 1) * B]
    model = _model()
    loss_fn = contrastive_attack_loss(logit_scale=model.logit_scale, text_negatives=gather_other_ranks(tl))
    steps = 1 + 4 * rank  # rank 0: 1 step, rank 1: 5 steps; a collective per step would time out
    x_adv = pgd(model, xl, tl, eps=8 / 255, step_size=2 / 255, steps=steps, loss_fn=loss_fn, random_start=False)
    before, after = loss_fn(model(xl), tl).mean(), loss_fn(model(x_adv), tl).mean()
    torch.distributed.barrier()  # both ranks got here: no collective was left waiting
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"before": float(before.detach()), "after": float(after.detach())}, f)
    teardown_distributed()


@pytest.mark.slow
def test_the_attack_needs_no_collective_when_ranks_run_different_step_counts(tmp_path):
    spawn_gloo(_uneven_attack_worker, str(tmp_path), world=WORLD)
    for r in range(WORLD):
        row = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert row["after"] > row["before"]  # the attack ascended the loss with global negatives


def test_one_process_gather_is_the_identity_and_the_others_are_empty():
    f = torch.randn(3, 5, requires_grad=True)
    assert gather_features(f) is f
    assert gather_other_ranks(f).shape == (0, 5) and not gather_other_ranks(f).requires_grad
    t = torch.randn(3, 5)
    a = clip_contrastive_loss(f, t, logit_scale=1.0, gather=True)
    b = clip_contrastive_loss(f, t, logit_scale=1.0, text_negatives=gather_other_ranks(t))
    assert torch.equal(a, clip_contrastive_loss(f, t, logit_scale=1.0)) and torch.equal(a, b)
    with pytest.raises(ValueError, match="reduction 'mean' or 'sum'"):
        clip_contrastive_loss(f, t, logit_scale=1.0, gather=True, reduction="none")
    with pytest.raises(ValueError, match=r"text_negatives must be \(M, D\) with D = 5; got \(2, 4\)"):
        clip_contrastive_loss(f, t, logit_scale=1.0, text_negatives=torch.randn(2, 4))


def test_text_negatives_enter_the_image_to_text_term_only():
    g = torch.Generator().manual_seed(1)
    f, t, n = (torch.randn(k, 6, generator=g, dtype=torch.float64) for k in (4, 4, 3))
    got = clip_contrastive_loss(f, t, logit_scale=0.5, text_negatives=n, reduction="none")
    z = math.exp(0.5) * F.normalize(f, dim=1) @ F.normalize(torch.cat([t, n]), dim=1).T  # (4, 7)
    pos = z[:, :4].diagonal()
    want = 0.5 * ((z.logsumexp(1) - pos) + (z[:, :4].logsumexp(0) - pos))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_scale_grad_scales_the_gradient_only():
    x = torch.randn(4, requires_grad=True)
    y = scale_grad(x, scale=2.5)
    assert torch.equal(y, x)
    (y * torch.arange(4.0)).sum().backward()
    torch.testing.assert_close(x.grad, 2.5 * torch.arange(4.0))
