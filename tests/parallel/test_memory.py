"""The memory model (advtrain.parallel.estimate_memory, benchmarks/memory_model.py) against CPU measurements.

Tolerance: the per-block formula is exact for fp32 and bf16 autocast (the saved-tensor bytes of a real timm
block) and 8 bytes per token high for bf16 parameters, where the CPU LayerNorm keeps its statistics in bf16
and CUDA's in fp32 (the formula follows CUDA); whole tiny models, with and without activation checkpointing and
with class-token or average pooling, agree to 1%.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from advtrain.parallel import estimate_memory, format_memory_estimate, vit_block_bytes_per_token

ROOT = Path(__file__).resolve().parents[2]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("memory_model", ROOT / "benchmarks" / "memory_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_model"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load_benchmark()


@pytest.fixture(scope="module")
def check(bench):
    return bench.check_rows()


def test_block_formula_is_the_saved_tensor_count(check):
    blocks = {r["mode"]: r for r in check if r["depth"] == "1 block"}
    assert blocks["fp32"]["estimate"] == blocks["fp32"]["measured"]
    assert blocks["autocast"]["estimate"] == blocks["autocast"]["measured"]
    assert blocks["bf16"]["estimate"] - blocks["bf16"]["measured"] == 8 * (4 * 17)  # bf16 LN statistics on CPU


def test_whole_model_estimates_match_measurements_within_one_percent(check):
    rows = [r for r in check if r["depth"] != "1 block"]
    assert len(rows) == 3 * (3 * 2 + 3)  # 3 precisions x (3 models x [saved, alive] + 3 checkpointed)
    bad = [r for r in rows if not 0.99 <= r["ratio"] <= 1.01]
    assert not bad, bad
    exact = [r for r in rows if r["mode"] != "bf16"]
    assert all(r["estimate"] == r["measured"] for r in exact)


def test_checkpointing_keeps_only_block_inputs(check):
    """Checkpointed, doubling the depth adds 2 block inputs (B * N * D); un-checkpointed it adds 2 whole blocks."""
    get = lambda mode, depth, ac, how: next(
        r["measured"]
        for r in check
        if r["mode"] == mode  # noqa: E731
        and r["depth"] == depth
        and r["pool"] == "token"
        and r["ac"] == ac
        and r["how"] == how
    )
    tokens, dim = 4 * 17, 32
    assert (
        get("fp32", 4, True, "alive after forward") - get("fp32", 2, True, "alive after forward")
        == 2 * tokens * dim * 4
    )
    per_block = next(r["measured"] for r in check if r["mode"] == "fp32" and r["depth"] == "1 block")
    assert get("fp32", 4, False, "saved tensors") - get("fp32", 2, False, "saved tensors") == 2 * per_block


def test_convnet_meta_trace_equals_the_real_forward(bench):
    """Convnets are estimated from a meta-device trace; on a real ResNet forward it counts the same bytes."""
    import timm

    from advtrain.parallel._memory import _traced_activations

    torch.manual_seed(0)
    real = timm.create_model("resnet10t", num_classes=10).train()
    with torch.device("meta"):
        meta = timm.create_model("resnet10t", num_classes=10).train()
    x = torch.rand(2, 3, 64, 64)
    traced = _traced_activations(meta, img_size=64, batch=2, mode="fp32", checkpointing=False)
    assert traced == bench.saved_bytes(real, x, "fp32")  # the input image included, by both
    assert traced > 0


def test_paper_models_parameter_counts_and_orderings():
    kw = dict(img_size=224, batch_per_gpu=64, world=64, precision="bf16")
    g = {
        (p, ac): estimate_memory("vit_giant_patch14_224", parallel=p, activation_checkpointing=ac, **kw)
        for p in ("ddp", "fsdp")
        for ac in (False, True)
    }
    assert 1.0e9 < g["ddp", False].n_params < 1.02e9 and g["ddp", False].tokens == 257
    assert g["ddp", False].params == 4 * g["ddp", False].n_params
    assert g["fsdp", False].params < g["ddp", False].params / 60  # 1/64 of it, plus padding
    assert g["fsdp", True].total < g["fsdp", False].total < g["ddp", False].total
    assert g["ddp", True].activations < g["ddp", False].activations / 5
    h = estimate_memory("vit_huge_patch14_224", parallel="ddp", activation_checkpointing=False, **kw)
    assert 6.3e8 < h.n_params < 6.4e8
    line = format_memory_estimate(g["fsdp", True])
    assert "vit_giant_patch14_224 224px (257 tokens) x 64/GPU, 64 GPUs, fsdp + activation checkpointing" in line
    assert "not measured on a GPU" in line and "EMA" not in line


def test_an_ema_adds_one_fp32_copy_of_the_parameters_sharded_like_them():
    kw = dict(img_size=224, batch_per_gpu=64, world=64, precision="bf16", activation_checkpointing=False)
    for parallel in ("ddp", "fsdp"):
        plain = estimate_memory("vit_giant_patch14_224", parallel=parallel, **kw)
        ema = estimate_memory("vit_giant_patch14_224", parallel=parallel, ema=True, **kw)
        assert plain.ema == 0 and ema.ema == plain.params  # DDP: 4P; FSDP: this rank's padded shards
        assert ema.total - plain.total == plain.params
        assert f"EMA {plain.params / 2**30:.2f}, " in format_memory_estimate(ema)


def test_block_formula_by_hand():
    # ViT-B: D 768, F 3072, H 12; autocast: 8 * 768 + 2 * (6 * 768 + 2 * 3072) + 16 + 48
    assert vit_block_bytes_per_token(dim=768, mlp_hidden=3072, heads=12, mode="autocast") == 27712
    assert vit_block_bytes_per_token(dim=768, mlp_hidden=3072, heads=12, mode="fp32") == 4 * (8 * 768 + 6144) + 64
    assert vit_block_bytes_per_token(dim=8, mlp_hidden=32, heads=1, mode="bf16", layer_scale=True) == 2 * 144 + 20
    with pytest.raises(ValueError, match="unknown mode"):
        vit_block_bytes_per_token(dim=8, mlp_hidden=32, heads=1, mode="fp16")


@pytest.mark.parametrize(
    "bad", [dict(world=0), dict(batch_per_gpu=1.5), dict(parallel="zero3"), dict(precision="fp16")]
)
def test_estimate_rejects_bad_arguments(bad):
    kw = (
        dict(
            img_size=32,
            batch_per_gpu=2,
            world=1,
            parallel="ddp",
            activation_checkpointing=False,
            precision="fp32",
            num_classes=10,
            model_kwargs=dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2),
        )
        | bad
    )
    with pytest.raises(ValueError):
        estimate_memory("vit_tiny_patch16_224", **kw)


def test_the_script_writes_the_table(bench, tmp_path):
    rows, check = bench.main(["--no-check", "--world", "128", "--out", str(tmp_path / "m.md")])
    assert check == [] and len(rows) == (2 + 2 + 3 + 3) * 4 and {r["batch"] for r in rows} == {32}  # presets' stages
    text = (tmp_path / "m.md").read_text()
    assert text.count("| ViT-g/14 |") == 12 and "not measured on a GPU" in text
    assert text.count(" (preset) |") == 10  # each stage's row of its preset's own setup
