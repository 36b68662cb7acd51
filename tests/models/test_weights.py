"""load_weights: every checkpoint layout the recipes, DDP, torch.compile and timm write; strictness and reports."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from torch import nn

from advtrain.models import WeightsMismatchError, find_state_dict, load_weights, strip_prefixes


def _net(seed=0, classes=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(classes)).eval()


def _mlp(seed=0, out=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, out))


class Normalized(nn.Module):
    """The recipes' wrapper: ``inner.`` keys, non-persistent mean/std, a CLIP temperature when asked."""

    def __init__(self, inner, *, clip=False):
        super().__init__()
        self.inner = inner
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5), persistent=False)
        self.register_buffer("std", torch.full((1, 3, 1, 1), 0.25), persistent=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07))) if clip else None


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_plain_state_dict_file_loads_and_reports_its_sha256(tmp_path):
    src, dst = _mlp(0), _mlp(1)
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    r = load_weights(dst, path)
    assert _same(src, dst) and r.ok()
    assert r.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert set(r.loaded) == set(src.state_dict()) and r.prefixes == () and r.container == ()


def test_recipe_checkpoint_loads_into_the_bare_model(tmp_path):
    src, dst = _mlp(0), _mlp(1)
    wrapper = Normalized(src)
    ckpt = {
        "model": wrapper.state_dict(),
        "optim": {"state": {}, "param_groups": []},
        "ema": {},
        "rng": torch.zeros(4, dtype=torch.uint8),
        "samples_seen": 1024,
        "step": 8,
        "evals": "[]",
    }
    torch.save(ckpt, tmp_path / "ckpt-00000008.pt")
    r = load_weights(dst, tmp_path / "ckpt-00000008.pt")
    assert _same(src, dst)
    assert r.container == ("model",) and r.prefixes == ("inner.",)
    assert "mean" not in r.unexpected  # non-persistent: never saved


def test_recipe_clip_checkpoint_reports_the_temperature_unless_ignored():
    src, dst = _mlp(0), _mlp(1)
    sd = {"model": Normalized(src, clip=True).state_dict()}
    with pytest.raises(WeightsMismatchError, match=r"1 unexpected \['logit_scale'\]") as err:
        load_weights(dst, sd)
    assert err.value.report.unexpected == ("logit_scale",)
    assert not _same(src, dst)  # nothing written on failure
    r = load_weights(dst, sd, ignore=("logit_scale",))
    assert _same(src, dst) and r.ignored == ("logit_scale",)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "model.", "inner.module."])
@pytest.mark.parametrize("container", [None, "state_dict", "model"])
def test_wrapper_prefixes_and_containers(prefix, container):
    src, dst = _net(0), _net(1)
    x = torch.rand(2, 3, 5, 5)
    src(x), dst(x)  # materialize the lazy layer
    sd = {prefix + k: v for k, v in src.state_dict().items()}
    r = load_weights(dst, sd if container is None else {container: sd, "epoch": 3})
    assert _same(src, dst)
    assert "".join(r.prefixes) == prefix
    assert r.container == (() if container is None else (container,))


def test_a_model_whose_own_keys_start_with_model_keeps_them():
    class Wrapped(nn.Module):  # RobustBench-style nn.Sequential(normalize, model) keys: "model.*"
        def __init__(self, seed):
            super().__init__()
            self.model = _mlp(seed)

    src, dst = Wrapped(0), Wrapped(1)
    r = load_weights(dst, src.state_dict())
    assert _same(src, dst) and r.prefixes == ()
    r = load_weights(dst, {f"module.{k}": v for k, v in src.state_dict().items()})
    assert r.prefixes == ("module.",)


def test_strip_prefixes_never_makes_keys_collide():
    sd, p = strip_prefixes({"inner.w": 1, "w": 2}, {"w"})
    assert p == () and sd == {"inner.w": 1, "w": 2}


def test_missing_and_unexpected_keys_are_all_named_and_nothing_is_written():
    dst = _mlp(1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    sd = {k: v for k, v in _mlp(0).state_dict().items() if k != "2.bias"} | {
        "extra.weight": torch.zeros(1),
        "extra.bias": torch.zeros(1),
    }
    with pytest.raises(WeightsMismatchError) as err:
        load_weights(dst, sd)
    msg = str(err.value)
    assert "\n" not in msg
    assert "1 missing ['2.bias']" in msg and "2 unexpected ['extra.bias', 'extra.weight']" in msg
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())
    r = load_weights(dst, sd, strict=False)
    assert r.missing == ("2.bias",) and r.unexpected == ("extra.bias", "extra.weight")
    assert torch.equal(dst.state_dict()["2.bias"], before["2.bias"])


def test_shape_mismatch_raises_even_without_strict_unless_skipped():
    src, dst = _mlp(0, out=10), _mlp(1, out=3)  # another head
    with pytest.raises(WeightsMismatchError, match=r"2\.weight: checkpoint \(10, 8\) vs model \(3, 8\)"):
        load_weights(dst, src.state_dict(), strict=False)
    r = load_weights(dst, src.state_dict(), strict=False, skip_mismatched=True)
    assert {m[0] for m in r.mismatched} == {"2.weight", "2.bias"}
    assert set(r.missing) == {"2.weight", "2.bias"}
    assert torch.equal(dst[0].weight, src[0].weight) and not torch.equal(dst[2].bias, src[2].bias[:3])


def test_filter_fn_runs_after_prefix_stripping():
    src, dst = _mlp(0), _mlp(1)
    seen = []

    def double(sd, model):
        seen.append(sorted(sd))
        return {k: v * 2 for k, v in sd.items()}

    load_weights(dst, {f"module.{k}": v for k, v in src.state_dict().items()}, filter_fn=double)
    assert seen == [sorted(src.state_dict())]
    assert torch.equal(dst[0].weight, 2 * src[0].weight)


def test_explicit_key_picks_the_ema_weights():
    src, ema, dst = _mlp(0), _mlp(2), _mlp(1)
    ckpt = {"model": src.state_dict(), "ema": {f"module.{k}": v for k, v in ema.state_dict().items()}}
    r = load_weights(dst, ckpt, key="ema")
    assert _same(ema, dst) and r.container == ("ema",)
    with pytest.raises(KeyError, match="no key 'swa'"):
        load_weights(dst, ckpt, key="swa")


def test_checkpoints_with_pickled_code_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": _mlp(0).state_dict(), "cfg": Normalized(_mlp(0))}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_weights(_mlp(1), path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights(_mlp(1), tmp_path / "nope.pt")


def test_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    src, dst = _mlp(0), _mlp(1)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    assert load_weights(dst, tmp_path / "w.safetensors").ok() and _same(src, dst)


def test_no_state_dict_found():
    with pytest.raises(ValueError, match="no tensors"):
        find_state_dict({"epoch": 3, "config": {"lr": 0.1}})
    with pytest.raises(TypeError, match="mapping"):
        find_state_dict([torch.zeros(1)])


def test_timm_model_from_a_recipe_checkpoint(tmp_path):
    timm = pytest.importorskip("timm")
    src = timm.create_model("resnet10t", pretrained=False, num_classes=5)
    dst = timm.create_model("resnet10t", pretrained=False, num_classes=5)
    torch.save({"model": {f"_orig_mod.inner.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "c.pt")
    r = load_weights(dst, tmp_path / "c.pt")
    assert r.ok() and _same(src, dst) and r.prefixes == ("_orig_mod.", "inner.")
    other = timm.create_model("resnet10t", pretrained=False, num_classes=7)
    with pytest.raises(WeightsMismatchError, match=r"fc\.weight: checkpoint \(5, 512\) vs model \(7, 512\)"):
        load_weights(other, tmp_path / "c.pt")


def test_allow_missing_tolerates_only_the_named_model_keys_and_still_reports_them():
    src, dst = nn.Sequential(nn.Linear(2, 3)), nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 4))
    before = dst[1].weight.clone()
    with pytest.raises(WeightsMismatchError, match=r"2 missing \['1\.bias', '1\.weight'\]"):
        load_weights(dst, src.state_dict())
    with pytest.raises(WeightsMismatchError, match=r"'1\.weight'"):
        load_weights(dst, src.state_dict(), allow_missing=("1.bias",))
    report = load_weights(dst, src.state_dict(), allow_missing=("1.*",))
    assert report.missing == ("1.bias", "1.weight") and not report.ok() and "1.weight" in report.summary()
    assert torch.equal(dst[0].weight, src[0].weight) and torch.equal(dst[1].weight, before)
