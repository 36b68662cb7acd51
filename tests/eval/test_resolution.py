"""resolution_sweep, resize_images, format_resolution_table and plot_resolution."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from advtrain import pgd
from advtrain.eval import (
    EvalReport,
    ResolutionResult,
    evaluate,
    format_resolution_table,
    plot_resolution,
    resize_images,
    resolution_sweep,
)
from advtrain.tokens import resample_vit_, resize_reduce

ATTACK = functools.partial(pgd, eps=8 / 255, step_size=4 / 255, steps=2, random_start=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_vit(*, dynamic: bool = True, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=4, dynamic_img_size=dynamic
    ).eval()


def data(n: int = 16, size: int = 32, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, 3, size, size, generator=g), torch.randint(0, 4, (n,), generator=g)
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, n, 8)]


def reference(model, loader, size, **kw) -> EvalReport:
    """evaluate() on images resized by hand: resize_reduce to shrink, plain bilinear to grow."""

    def resize(x):
        if size <= x.shape[-1]:
            return resize_reduce(x, size)
        return nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False).clamp(0, 1)

    return evaluate(model, [(resize(x), y) for x, y in loader], progress=False, **kw)


def test_sweep_on_a_dynamic_vit_reports_every_size_and_matches_evaluate(tmp_path):
    model, loader = tiny_vit(), data()
    results = resolution_sweep(model, loader, sizes=(32, 48, 64, 16), attacks={"pgd": ATTACK}, progress=False)
    assert [r.size for r in results] == [32, 48, 64, 16]
    assert all(isinstance(r, ResolutionResult) and isinstance(r.report, EvalReport) for r in results)
    assert any(r.report.clean > 0 for r in results)  # the attack ran somewhere: the comparison below is not vacuous
    for size, report in results:
        ref = reference(model, loader, size, attacks={"pgd": ATTACK})
        assert report.n == 16 and 0 <= report.robust["pgd"] <= report.clean <= 1
        assert (report.clean, report.robust) == (ref.clean, ref.robust), size
    # the native size is evaluate() on the loader itself
    native = evaluate(model, loader, attacks={"pgd": ATTACK}, progress=False)
    assert (results[0].report.clean, results[0].report.robust) == (native.clean, native.robust)

    table = format_resolution_table(results)
    lines = table.splitlines()
    assert lines[0] == "| resolution | clean (%) | pgd (%) | n | time (s) |" and len(lines) == 2 + 4
    for line, (size, report) in zip(lines[2:], results):
        assert line.startswith(f"| {size} | {100 * report.clean:.2f} | {100 * report.robust['pgd']:.2f} | 16 |")

    path = plot_resolution(results, tmp_path / "res.png", title="tiny ViT")
    assert path == tmp_path / "res.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_fixed_size_vit_runs_from_a_resampled_copy_and_is_left_unchanged():
    model, loader = tiny_vit(dynamic=False), data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    results = resolution_sweep(model, loader, sizes=(48, 32), attacks={"pgd": ATTACK}, progress=False)
    assert model.patch_embed.img_size == (32, 32) and model.pos_embed.shape == (1, 17, 32)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    ref = reference(resample_vit_(copy.deepcopy(model), img_size=48), loader, 48, attacks={"pgd": ATTACK})
    assert (results[0].report.clean, results[0].report.robust) == (ref.clean, ref.robust)
    # a fixed ViT inside a wrapper is found too
    wrapped = nn.Sequential(nn.Identity(), model)
    assert resolution_sweep(wrapped, loader, sizes=(48,), progress=False)[0].report.clean == ref.clean
    with pytest.raises(ValueError, match="multiple of the patch size"):
        resolution_sweep(model, loader, sizes=(36,), progress=False)


def test_modes_restored_max_samples_pairs_and_extra_batch_items():
    model = tiny_vit().train()
    loader = [(x, y, "extra") for x, y in data(24)]
    results = resolution_sweep(model, loader, sizes=(40, (24, 48)), max_samples=10, progress=False)
    assert [r.report.n for r in results] == [10, 10]
    assert model.training and all(m.training for m in model.modules())
    assert "| 24x48 |" in format_resolution_table(results)


@settings(max_examples=30)
@given(
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    big_h=st.integers(1, 12),
    big_w=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_resize_images_is_a_convex_combination_and_matches_the_references(h, w, big_h, big_w, seed):
    x = torch.rand(2, 3, big_h, big_w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out = resize_images(x, (h, w))
    assert out.shape == (2, 3, h, w) and out.dtype == x.dtype
    assert out.min() >= x.min() and out.max() <= x.max()
    if h <= big_h and w <= big_w:
        assert torch.equal(out, resize_reduce(x, (h, w)) if (h, w) != (big_h, big_w) else x)
    elif h >= big_h and w >= big_w:
        up = nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        torch.testing.assert_close(out, up)
    const = torch.full((1, 1, big_h, big_w), 0.25)
    assert torch.equal(resize_images(const, (h, w)), torch.full((1, 1, h, w), 0.25))


def test_table_marks_missing_metrics_and_plot_handles_them(tmp_path):
    rows = [(224, EvalReport(50, 0.8, {"pgd": 0.5}, 1.0)), (288, EvalReport(50, 0.82, {"aa": 0.4}, 2.5))]
    assert format_resolution_table(rows) == "\n".join(
        [
            "| resolution | clean (%) | pgd (%) | aa (%) | n | time (s) |",
            "|---|---|---|---|---|---|",
            "| 224 | 80.00 | 50.00 | - | 50 | 1.0 |",
            "| 288 | 82.00 | - | 40.00 | 50 | 2.5 |",
        ]
    )
    assert plot_resolution(rows, str(tmp_path / "r.png")).stat().st_size > 0


def test_bad_arguments():
    model, loader = tiny_vit(), data(8)
    with pytest.raises(ValueError, match="non-empty"):
        resolution_sweep(model, loader, sizes=(), progress=False)
    with pytest.raises(ValueError, match="non-empty"):
        resolution_sweep(model, loader, sizes=32, progress=False)
    with pytest.raises(ValueError, match=r"sizes\[1\]\[0\] must be >= 1"):
        resolution_sweep(model, loader, sizes=(32, 0), progress=False)
    with pytest.raises(TypeError, match=r"sizes\[0\]"):
        resolution_sweep(model, loader, sizes=(32.0,), progress=False)
    with pytest.raises(TypeError, match="re-iterable"):
        resolution_sweep(model, iter(loader), sizes=(32,), progress=False)
    with pytest.raises(ValueError, match="no samples"):
        resolution_sweep(model, [], sizes=(32,), progress=False)
    with pytest.raises(ValueError, match="4-D|\\(B, C, H, W\\)"):
        resize_images(torch.rand(3, 8, 8), 4)
    with pytest.raises(ValueError, match="empty"):
        format_resolution_table([])
    with pytest.raises(ValueError, match="empty"):
        plot_resolution([], "unused.png")
    with pytest.raises(TypeError, match=r"results\[0\]"):
        format_resolution_table([(224, {"clean": 0.5})])
