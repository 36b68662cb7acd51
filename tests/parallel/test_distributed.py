"""FSDP2 on 2 gloo processes (CPU) against DDP and one process: training, the attack, DCP checkpoints.

Two spawns of 2 processes each (about 15 s together on 2 CPU cores), shared by the tests of this module: the
first trains under FSDP (plain, with activation checkpointing, under bf16) and under DDP from one init, attacks
through the sharded model and saves a DCP checkpoint after 3 of 5 steps; the second resumes that checkpoint in
fresh processes. The single-process references run here.

Tolerances: fp32 losses of FSDP, DDP and one process agree to 1e-5 (relative) over 5 AdamW steps and the final
parameters to 1e-5 absolute: the three differ only in the order of float sums (gradients averaged over ranks
vs over the batch). A resume on 2 processes is bit-identical; one on 1 process matches to the same 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from tests.parallel import _jobs
from tests.parallel._dist import run_ranks

pytestmark = pytest.mark.slow
WORLD = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    run_ranks(_jobs.job_train_attack_save, WORLD, str(out))
    run_ranks(_jobs.job_resume, WORLD, str(out))
    res = [torch.load(out / f"result-{r}.pt", weights_only=False) for r in range(WORLD)]
    resume = [torch.load(out / f"resume-{r}.pt", weights_only=False) for r in range(WORLD)]
    return out, res, resume


@pytest.fixture(scope="module")
def single():
    """One process, the whole global batch: the reference trajectory."""
    model = _jobs.make_model()
    opt = _jobs.make_optimizer(model)
    losses = _jobs.train(model, opt, steps=range(5))
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_fsdp_training_matches_ddp_and_one_process(runs, single):
    _, res, _ = runs
    ref_losses, ref_final = single
    fsdp, ddp = res[0]["fsdp_losses"], res[0]["ddp_losses"]
    assert res[1]["fsdp_losses"] == fsdp  # every rank logs the same global loss
    assert fsdp == pytest.approx(ref_losses, rel=1e-5)
    assert ddp == pytest.approx(ref_losses, rel=1e-5)
    assert ref_losses[-1] < ref_losses[0]  # it trains (the check is not vacuous)
    assert _max_diff(res[0]["fsdp_final"], ref_final) < 1e-5
    assert _max_diff(res[0]["ddp_final"], ref_final) < 1e-5
    assert _max_diff(res[0]["fsdp_final"], res[1]["fsdp_final"]) == 0.0  # both ranks gather the same model
    assert _max_diff(res[0]["fsdp_final"], _jobs.make_model().state_dict()) > 1e-3  # the weights moved


def test_activation_checkpointing_changes_nothing_but_memory(runs, single):
    _, res, _ = runs
    assert res[0]["fsdp_ac_losses"] == pytest.approx(single[0], rel=1e-5)


def test_bf16_mixed_precision_computes_in_bf16_and_keeps_fp32_shards(runs, single):
    _, res, _ = runs
    assert res[0]["bf16_dtypes"] == (torch.bfloat16, torch.bfloat16)
    assert res[0]["bf16_param_dtype"] == torch.float32  # the sharded master weights
    assert res[0]["fsdp_bf16_losses"] == pytest.approx(single[0], abs=3e-2)
    assert res[0]["fsdp_bf16_losses"] != pytest.approx(single[0], rel=1e-6)  # it did run in another precision


def test_attack_through_fsdp_equals_the_unsharded_attack_and_reduces_nothing(runs):
    _, res, _ = runs
    for r in res:
        assert torch.equal(r["adv_fsdp"], r["adv_plain"])
        assert not torch.equal(r["adv_fsdp"], _jobs.global_batch(99)[0])  # the attack moved the images
        assert r["rs_calls_attack"] == 0 and r["grads_after_attack"] == 0
        # the counters are live: a training backward does reduce-scatter (root + 2 blocks) and fill .grad
        assert r["rs_calls_train"] == 3 and r["grads_after_train"] == r["n_params"]


def test_attack_backward_computes_input_gradients_only(runs):
    """Per linear layer: a forward is 1 matrix product, an input-only backward 1 more, weight gradients 1 more."""
    _, res, _ = runs
    f = res[0]["mm_forward"]
    assert f > 0
    assert res[0]["mm_attack"] == 2 * (2 * f)  # 2 steps x (forward + input backward), no weight products
    assert res[0]["mm_train"] > 2 * f  # the training backward computes weight gradients (sanity of the counter)


def test_dcp_checkpoint_resumes_bit_identically_on_two_processes(runs):
    _, res, resume = runs
    for r in range(WORLD):
        assert resume[r]["losses"] == res[r]["fsdp_losses"][3:]  # exact float equality
        assert resume[r]["extra"] == {"step": 3}
        assert resume[r]["rank_state"] == {"rank": r, "pos": 3 * _jobs.GLOBAL_BATCH // WORLD}
        assert resume[r]["saved_world"] == WORLD
    assert _max_diff(resume[0]["final"], res[0]["fsdp_final"]) == 0.0
    assert _max_diff(resume[0]["ema"], _jobs.make_model(seed=1).state_dict()) == 0.0


def test_dcp_checkpoint_resumes_on_one_process(runs, single):
    """Resharding: 2 ranks' shards load into a plain model and a fresh AdamW in this process (no process group)."""
    from advtrain.parallel import latest_checkpoint, load_checkpoint

    out, res, _ = runs
    model = _jobs.make_model(seed=7)
    opt = _jobs.make_optimizer(model)
    r = load_checkpoint(latest_checkpoint(out), model=model, optimizer=opt)
    assert r.saved_world == WORLD and r.rank_state is None and r.extra == {"step": 3}
    assert opt.state_dict()["state"][0]["step"] == 3
    losses = _jobs.train(model, opt, steps=range(3, 5))
    assert losses == pytest.approx(res[0]["fsdp_losses"][3:], rel=1e-5)
    assert _max_diff(model.state_dict(), res[0]["fsdp_final"]) < 1e-5


def test_converted_checkpoint_loads_into_timm_strictly(runs, tmp_path):
    import timm

    from advtrain.parallel import consolidate, latest_checkpoint
    from advtrain.parallel.consolidate import main

    out, _, _ = runs
    path = latest_checkpoint(out)
    timm_kw = {k: v for k, v in _jobs.TIMM.items() if k != "model_name"}
    for suffix in (".pt", ".safetensors"):
        target = tmp_path / f"vit{suffix}"
        assert (
            main(
                [
                    str(path),
                    str(target),
                    "--timm-model",
                    _jobs.TIMM["model_name"],
                    "--timm-kwargs",
                    __import__("json").dumps(timm_kw),
                ]
            )
            == 0
        )
    sd = torch.load(tmp_path / "vit.pt", weights_only=True)
    vit = timm.create_model(_jobs.TIMM["model_name"], pretrained=False, **timm_kw)
    assert str(vit.load_state_dict(sd, strict=True)) == "<All keys matched successfully>"
    assert not any(k.startswith("inner.") for k in sd)
    wrapped = _jobs.make_model(seed=9)
    from advtrain.parallel import load_checkpoint

    load_checkpoint(path, model=wrapped)
    assert all(torch.equal(sd[k], v) for k, v in wrapped.inner.state_dict().items())
    ema = consolidate(path, tmp_path / "ema.pt", key="ema")
    assert all(torch.equal(ema[k], v) for k, v in _jobs.make_model(seed=1).inner.state_dict().items())


def test_memory_model_counts_fsdp_shards_exactly(runs):
    """The estimate's per-rank parameter, gradient and AdamW bytes are the real FSDP2 shards (padding included)."""
    from advtrain.parallel import estimate_memory

    _, res, _ = runs
    kw = {k: v for k, v in _jobs.TIMM.items() if k not in ("model_name", "num_classes")}
    e = estimate_memory(
        _jobs.TIMM["model_name"],
        img_size=32,
        batch_per_gpu=4,
        world=WORLD,
        parallel="fsdp",
        activation_checkpointing=False,
        precision="fp32",
        num_classes=10,
        model_kwargs=kw,
    )
    # rank 0 holds the ceil(rows / W) chunk of every parameter, the estimate's (padded) count; the last ranks less
    assert res[0]["shard_bytes"] == {"params": e.params, "grads": e.grads, "optim": e.optim}
    assert all(res[1]["shard_bytes"][k] <= v for k, v in res[0]["shard_bytes"].items())
    total = sum(p.numel() for p in _jobs.make_model().parameters())
    assert e.n_params == total
    assert res[0]["shard_bytes"]["params"] + res[1]["shard_bytes"]["params"] == 4 * total  # a partition
    assert res[0]["shard_bytes"]["optim"] + res[1]["shard_bytes"]["optim"] == 8 * total


def test_timm_ema_on_a_sharded_model_matches_one_process(runs):
    _, _, resume = runs
    ref = _jobs.ema_run()
    assert _max_diff(resume[0]["ema_updated"], ref) < 1e-5
    assert _max_diff(resume[0]["ema_updated"], _jobs.make_model().state_dict()) > 1e-4  # it moved


def test_broadcast_buffers_gives_every_rank_rank0s_statistics(runs):
    _, _, resume = runs
    assert not torch.equal(resume[0]["bn_before"], resume[1]["bn_before"])
    assert torch.equal(resume[1]["bn_after"], resume[0]["bn_before"])
    assert torch.equal(resume[0]["bn_after"], resume[0]["bn_before"])


def test_a_convnext_sharded_per_stage_trains_like_one_process(runs):
    _, _, resume = runs
    model = _jobs.make_convnext()
    ref = _jobs.train(model, _jobs.make_optimizer(model), steps=range(2))
    assert resume[0]["convnext_losses"] == pytest.approx(ref, rel=1e-5)


def test_a_ddp_checkpoint_in_the_same_format_loads_into_a_plain_model(runs):
    from advtrain.parallel import latest_checkpoint, load_checkpoint

    out, res, _ = runs
    path = latest_checkpoint(out / "ddp")
    assert sorted(p.name for p in path.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    model = _jobs.make_model(seed=3)
    opt = _jobs.make_optimizer(model)
    r = load_checkpoint(path, model=model, optimizer=opt)
    assert r.saved_world == WORLD and opt.state_dict()["state"][0]["step"] == 5
    assert _max_diff(model.state_dict(), res[0]["ddp_final"]) == 0.0
