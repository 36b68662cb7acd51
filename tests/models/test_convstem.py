"""ConvStem and convstem_: same token grid / feature map as the patch stem it replaces, trainable, attackable."""

from __future__ import annotations

import copy
import functools
import inspect

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.layers import LayerNorm2d
from timm.models.convnext import ConvNeXt
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import advtrain.models as models
from advtrain import pgd
from advtrain.models import ConvStem, convstem_
from advtrain.tokens import resample_vit_, vit_forward_tokens


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run many small kernels: one intra-op thread is faster on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_vit(patch: int = 8, img_size: int = 32, *, seed: int = 0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    kw = {"embed_dim": 32, "depth": 1, "num_heads": 2, "num_classes": 3} | kw
    return VisionTransformer(img_size=img_size, patch_size=patch, **kw).eval()


def tiny_convnext(*, seed: int = 0, **kw) -> ConvNeXt:
    torch.manual_seed(seed)
    return ConvNeXt(depths=(1, 1, 1, 1), dims=(16, 24, 32, 40), num_classes=3, **kw).eval()


def conv_params(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k * k + c_out


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------------ ViT


def test_vit_s16_at_224_keeps_the_14x14_grid_and_the_paper_layout():
    model = timm.create_model("vit_small_patch16_224", depth=1, num_classes=3).eval()
    patch_stem = copy.deepcopy(model.patch_embed)
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    assert convstem_(model) is model
    assert model.patch_embed(x).shape == patch_stem(x).shape == (2, 14 * 14, 384)
    assert model(x).shape == (2, 3)

    stem = model.patch_embed.proj
    convs = [m for m in stem.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 48), (48, 96), (96, 192), (192, 384), (384, 384)]
    assert [c.kernel_size for c in convs] == [(3, 3)] * 4 + [(1, 1)]
    assert [c.stride for c in convs] == [(2, 2)] * 4 + [(1, 1)]
    norms = [m for m in stem.modules() if isinstance(m, LayerNorm2d)]
    assert [n.normalized_shape for n in norms] == [(48,), (96,), (192,), (384,)] and norms[0].eps == 1e-6
    assert sum(isinstance(m, nn.GELU) and m.approximate == "none" for m in stem.modules()) == 4
    # the authors' ConvBlock: Sequential `stem` of conv, LayerNorm, GELU (x4), then the 1x1 conv at index 12
    keys = [k for k in model.state_dict() if k.startswith("patch_embed.")]
    assert keys == [f"patch_embed.proj.stem.{i}.{p}" for i in (0, 1, 3, 4, 6, 7, 9, 10, 12) for p in ("weight", "bias")]

    # parameters: 295,296 in the 16x16 patchify conv; 1,022,208 in the ConvStem
    assert n_params(patch_stem) == conv_params(3, 384, 16) == 295_296
    chans = [3, 48, 96, 192, 384]
    expected = sum(conv_params(a, b, 3) + 2 * b for a, b in zip(chans, chans[1:])) + conv_params(384, 384, 1)
    assert n_params(stem) == expected == 1_022_208


@functools.cache
def _vit_pair(patch: int):
    """(original, convstem) dynamic-size ViTs with patch ``patch``; small default channels for speed."""
    original = tiny_vit(patch, img_size=2 * patch, dynamic_img_size=True)
    channels = tuple(8 * 2**i for i in range(patch.bit_length() - 1))
    return original, convstem_(copy.deepcopy(original), channels=channels)


@settings(max_examples=20)
@given(patch=st.sampled_from([2, 4, 8, 16]), gh=st.integers(1, 5), gw=st.integers(1, 5), seed=st.integers(0, 99))
def test_vit_token_grid_matches_the_patch_stem_at_any_size(patch, gh, gw, seed):
    original, model = _vit_pair(patch)
    x = torch.rand(2, 3, gh * patch, gw * patch, generator=torch.Generator().manual_seed(seed))
    tokens = model.patch_embed(x)
    assert tokens.shape == original.patch_embed(x).shape == (2, gh, gw, 32)  # dynamic_img_size: NHWC
    assert model.patch_embed.proj.stride == patch
    assert model(x).shape == (2, 3) and torch.isfinite(model(x)).all()


def test_vit_dynamic_img_pad_gives_the_ceiled_grid_as_the_patch_stem():
    original = tiny_vit(8, dynamic_img_size=True, dynamic_img_pad=True)
    model = convstem_(copy.deepcopy(original), channels=(8, 16, 32))
    x = torch.rand(1, 3, 30, 41)
    assert model.patch_embed(x).shape == original.patch_embed(x).shape == (1, 4, 6, 32)


def test_fixed_size_vit_composes_with_resample_and_token_forward():
    model = convstem_(tiny_vit(8, img_size=32, reg_tokens=1), channels=(8, 16, 32))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(vit_forward_tokens(model, x), model(x))
    resample_vit_(model, img_size=48)
    assert model.patch_embed.grid_size == (6, 6) and model(torch.rand(1, 3, 48, 48)).shape == (1, 3)


def test_forward_backward_reaches_every_stem_parameter_and_pgd_runs():
    model = convstem_(tiny_vit(8).train(), channels=(8, 16, 32))
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 0])
    nn.functional.cross_entropy(model(x), y).backward()
    for name, p in model.patch_embed.proj.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    model.eval()
    x_adv = pgd(model, x, y, eps=4 / 255, step_size=2 / 255, steps=2)
    assert x_adv.shape == x.shape and (x_adv - x).abs().max() <= 4 / 255 + 1e-6
    assert (x_adv - x).abs().max() > 0


def test_dtype_device_and_mode_of_the_old_stem_are_kept():
    model = tiny_vit(8).double()
    convstem_(model, channels=(4, 8, 8))
    assert all(p.dtype == torch.float64 for p in model.patch_embed.proj.parameters())
    assert not model.patch_embed.proj.training
    assert model(torch.rand(1, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64
    trained = convstem_(tiny_vit(8).train(), channels=(4, 8, 8), norm="batch", act="relu")
    assert trained.patch_embed.proj.training
    assert sum(isinstance(m, nn.BatchNorm2d) for m in trained.modules()) == 3
    assert sum(isinstance(m, nn.ReLU) for m in trained.modules()) == 3
    assert not any(isinstance(m, (LayerNorm2d, nn.GELU)) for m in trained.patch_embed.modules())


# ------------------------------------------------------------------------------------------------ ConvNeXt


@pytest.mark.parametrize(
    ("kwargs", "channels", "strides"),
    [
        ({}, None, [2, 2]),  # default: (d0 / 2, d0), the authors' ConvNeXt-T/S stem
        ({}, (8, 12, 16), [2, 2, 1]),  # the authors' ConvNeXt-B/L layout (d0/2, 3 d0/4, d0), last at stride 1
        ({"patch_size": 2}, None, [2]),
        ({"stem_type": "overlap_tiered"}, (4, 16), [2, 2]),
    ],
)
def test_convnext_stem_output_shape_equals_the_original(kwargs, channels, strides):
    original = tiny_convnext(**kwargs)
    model = convstem_(copy.deepcopy(original), channels=channels)
    assert isinstance(model.stem, ConvStem)
    convs = [m for m in model.stem.modules() if isinstance(m, nn.Conv2d)]
    assert [c.stride[0] for c in convs] == strides and convs[-1].out_channels == 16
    assert isinstance(list(model.stem.stem)[-1], nn.GELU)  # ends on conv-norm-act: no 1x1 projection
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    assert model.stem(x).shape == original.stem(x).shape
    out = model(x)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.stem.parameters())


def test_convnext_tiny_default_stem_parameters():
    model = ConvNeXt(depths=(1, 1, 1, 1), dims=(96, 8, 8, 8), num_classes=3)  # the stem only sees dims[0]
    before = n_params(model.stem)
    convstem_(model)
    assert before == conv_params(3, 96, 4) + 2 * 96 == 4_896
    assert n_params(model.stem) == conv_params(3, 48, 3) + 2 * 48 + conv_params(48, 96, 3) + 2 * 96 == 43_200


# ------------------------------------------------------------------------------------------------ ConvStem itself


@pytest.mark.parametrize(("h", "w"), [(32, 32), (33, 17), (1, 8)])
def test_convstem_output_is_the_ceiled_grid(h, w):
    stem = ConvStem(3, 10, channels=(4, 6, 8), stride=8)
    assert stem(torch.rand(1, 3, h, w)).shape == (1, 10, -(-h // 8), -(-w // 8))


def test_bad_arguments_raise_and_leave_the_model_unchanged():
    with pytest.raises(TypeError, match="VisionTransformer or ConvNeXt"):
        convstem_(nn.Linear(2, 2))
    model = tiny_vit(8)
    for kwargs, error, match in [
        ({"channels": (8, 16)}, ValueError, "at least 3"),
        ({"channels": (8, 0, 16)}, ValueError, r"channels\[1\] must be >= 1"),
        ({"channels": (8, 16.0, 32)}, TypeError, r"channels\[1\] must be an int"),
        ({"channels": "abc"}, TypeError, "sequence of ints"),
        ({"channels": 48}, TypeError, "sequence of ints"),
        ({"norm": "group"}, ValueError, "norm must be"),
        ({"act": "silu"}, ValueError, "act must be"),
    ]:
        with pytest.raises(error, match=match):
            convstem_(model, **kwargs)
        assert isinstance(model.patch_embed.proj, nn.Conv2d)  # nothing replaced
    convstem_(model, channels=(4, 8, 8))
    with pytest.raises(ValueError, match="patchify"):
        convstem_(model)
    with pytest.raises(ValueError, match="power of two"):
        convstem_(tiny_vit(12, img_size=36))
    with pytest.raises(ValueError, match="square"):
        convstem_(tiny_vit((8, 16), img_size=32))
    with pytest.raises(ValueError, match="out_chans=16"):
        ConvStem(3, 16, channels=(8, 12), stride=4, project=False)
    for stride in (1, 6, 0):
        with pytest.raises(ValueError, match="power of two"):
            ConvStem(3, 16, channels=(8, 12, 16), stride=stride)
    with pytest.raises(TypeError, match="stride must be an int"):
        ConvStem(3, 16, channels=(8, 12), stride=4.0)
    with pytest.raises(ValueError, match="in_chans must be >= 1"):
        ConvStem(0, 16, channels=(8, 12), stride=4)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*\(2, 1, 8, 8\)"):
        ConvStem(3, 16, channels=(8, 12), stride=4)(torch.rand(2, 1, 8, 8))


def test_public_surface_and_docstrings():
    assert set(models.__all__) == {
        "ConvStem",
        "StemAct",
        "StemNorm",
        "convstem_",
        "WeightsMismatchError",
        "WeightsReport",
        "file_sha256",
        "find_state_dict",
        "load_weights",
        "read_checkpoint",
        "strip_prefixes",
    }
    for name in ("ConvStem", "convstem_"):
        obj = getattr(models, name)
        assert obj.__module__ == "advtrain.models._convstem"
        fn = obj.__init__ if inspect.isclass(obj) else obj
        for p in list(inspect.signature(fn).parameters.values()):
            if p.default is not p.empty:
                assert p.kind is p.KEYWORD_ONLY, (name, p)
        doc = inspect.getdoc(obj)
        assert doc.splitlines()[0].endswith(".") and len(doc.splitlines()[0]) <= 120
        for section in ("Args:", "Raises:", "Example:", "References:", "arXiv 2303.01870"):
            assert section in doc, (name, section)
