"""Split BatchNorm: equal to two BatchNorms on the split batch, routing in train and eval, checkpoint keys, ghost BN."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from advtrain.bn import (
    SplitBatchNorm1d,
    SplitBatchNorm2d,
    SplitSyncBatchNorm,
    bn_route,
    convert_split_bn_,
    ghost_bn,
    revert_split_bn_,
    split_parameters,
)
from tests.helpers import tiny_cnn

# (BatchNorm class, per-sample shape after the channel dim)
KINDS = {
    "1d": (nn.BatchNorm1d, ()),
    "1d-seq": (nn.BatchNorm1d, (5,)),
    "2d": (nn.BatchNorm2d, (3, 2)),
    "3d": (nn.BatchNorm3d, (2, 2, 2)),
    "sync": (nn.SyncBatchNorm, (3, 2)),
}
C = 3


def _randomize_(bn: nn.Module, g: torch.Generator) -> None:
    """Distinct affine parameters and running statistics, so that main and aux BN differ."""
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=g, dtype=bn.weight.dtype) + 0.5)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=g, dtype=bn.bias.dtype))
        if bn.running_mean is not None:
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g, dtype=bn.running_mean.dtype))
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g, dtype=bn.running_var.dtype) + 0.5)


def _pair(kind: str, seed: int, *, affine=True, track=True, momentum=0.1):
    """A split BN (wrapped in a Sequential) and two plain BNs equal to its main and auxiliary BNs."""
    cls, _ = KINDS[kind]
    g = torch.Generator().manual_seed(seed)
    bn = cls(C, affine=affine, track_running_stats=track, momentum=momentum).double()
    _randomize_(bn, g)
    model = convert_split_bn_(nn.Sequential(bn))
    _randomize_(model[0].aux, g)
    return model, copy.deepcopy(bn), copy.deepcopy(model[0].aux)


def _grads(module: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in module.parameters(recurse=False)]


@pytest.mark.parametrize("kind", sorted(KINDS))
@given(
    seed=st.integers(0, 2**31 - 1),
    n_clean=st.integers(0, 6),
    n_aux=st.integers(0, 6),
    train=st.booleans(),
    momentum=st.sampled_from([0.1, 0.5, None]),
    affine=st.booleans(),
    track=st.booleans(),
)
@settings(max_examples=40)
def test_split_bn_equals_two_batch_norms_applied_to_the_split_batch(
    kind, seed, n_clean, n_aux, train, momentum, affine, track
):
    if (train or not track) and (n_clean == 1 or n_aux == 1) and not KINDS[kind][1]:
        n_clean, n_aux = n_clean + (n_clean == 1), n_aux + (n_aux == 1)  # one value per channel cannot train
    if n_clean + n_aux == 0:
        n_aux = 2
    model, main_ref, aux_ref = _pair(kind, seed, affine=affine, track=track, momentum=momentum)
    for m in (model, main_ref, aux_ref):
        m.train(train)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n_clean + n_aux, C, *KINDS[kind][1], generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(x.shape, generator=g, dtype=torch.float64)
    with bn_route(model, split=(n_clean, n_aux)):
        out = model(x)
    (out * w).sum().backward()

    x_ref = x.detach().clone().requires_grad_(True)
    parts = []
    if n_clean:
        parts.append(main_ref(x_ref[:n_clean]))
    if n_aux:
        parts.append(aux_ref(x_ref[n_clean:]))
    ref = torch.cat(parts)
    (ref * w).sum().backward()

    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)
    split = model[0]
    for mine, theirs, used in ((split, main_ref, n_clean), (split.aux, aux_ref, n_aux)):
        for a, b in zip(mine.parameters(recurse=False), theirs.parameters(recurse=False)):
            if used:
                torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)
            else:
                assert a.grad is None
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            a, b = getattr(mine, name), getattr(theirs, name)
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("route", ["clean", "adv"])
@pytest.mark.parametrize("train", [True, False])
def test_a_route_sends_the_whole_batch_through_one_bn(kind, route, train):
    model, main_ref, aux_ref = _pair(kind, 3)
    ref = main_ref if route == "clean" else aux_ref
    model.train(train), ref.train(train)
    x = torch.randn(4, C, *KINDS[kind][1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with bn_route(model, route):
        out = model(x)
    torch.testing.assert_close(out, ref(x), rtol=0, atol=1e-12)
    other = model[0].aux if route == "clean" else model[0]
    untouched = aux_ref if route == "clean" else main_ref
    assert torch.equal(other.running_mean, untouched.running_mean)  # the other BN's statistics did not move


def test_eval_mode_routes_use_each_bn_running_statistics_and_update_nothing():
    model, main_ref, aux_ref = _pair("2d", 7)
    model.eval()
    x = torch.randn(5, C, 3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def by_hand(bn, t):
        return F.batch_norm(t, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)

    with torch.no_grad():
        clean = model(x)  # the default route is clean
        with bn_route(model, "adv"):
            adv = model(x)
            with bn_route(model, "clean"):  # blocks nest
                inner = model(x)
            assert model[0].route == "adv"
        with bn_route(model, split=(2, 3)):
            mixed = model(x)
    assert model[0].route == "clean"
    torch.testing.assert_close(clean, by_hand(main_ref, x), rtol=0, atol=1e-12)
    torch.testing.assert_close(inner, clean, rtol=0, atol=0)
    torch.testing.assert_close(adv, by_hand(aux_ref, x), rtol=0, atol=1e-12)
    torch.testing.assert_close(mixed, torch.cat([clean[:2], adv[2:]]), rtol=0, atol=1e-12)
    assert not torch.allclose(clean, adv)  # the test can tell the two BNs apart
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_the_route_is_restored_when_the_block_raises():
    model = convert_split_bn_(tiny_cnn())
    with pytest.raises(RuntimeError, match="boom"), bn_route(model, "adv"):
        raise RuntimeError("boom")
    assert model[1].route == "clean"


def test_the_converted_model_computes_what_the_original_did_until_routed():
    original = tiny_cnn()
    model = convert_split_bn_(copy.deepcopy(original))
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for train in (True, False):
        original.train(train), model.train(train)
        torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)
    assert torch.equal(model[1].running_mean, original[1].running_mean)


def test_conversion_keeps_the_main_bn_tensors_and_copies_them_into_the_aux_bn():
    model = tiny_cnn()
    bn = model[1]
    bn.weight.grad = torch.ones_like(bn.weight)
    weight, mean = bn.weight, bn.running_mean
    convert_split_bn_(model)
    split = model[1]
    assert isinstance(split, SplitBatchNorm2d) and isinstance(split, nn.BatchNorm2d)
    assert split.weight is weight and split.running_mean is mean  # an optimizer built before still works
    assert torch.equal(split.aux.weight, weight) and split.aux.weight is not weight
    assert torch.equal(split.aux.running_mean, mean) and split.aux.running_mean is not mean
    assert split.aux.weight.grad is None and torch.equal(split.weight.grad, torch.ones_like(weight))
    assert split.training == bn.training and split.aux.training == bn.training


def test_checkpoint_keys_match_the_unconverted_model_and_timm():
    timm_split = pytest.importorskip("timm.layers.split_batchnorm")
    plain = tiny_cnn()
    plain_state = plain.state_dict()
    model = convert_split_bn_(copy.deepcopy(plain))
    keys = set(model.state_dict())
    aux_keys = {f"1.aux_bn.0.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert keys == set(plain_state) | aux_keys

    # a checkpoint of the unconverted model loads strictly; the aux BNs start as copies of the main ones
    fresh = convert_split_bn_(tiny_cnn(seed=1))
    with torch.no_grad():
        plain[1].running_mean.add_(3.0)
    fresh.load_state_dict(plain.state_dict())
    assert torch.equal(fresh[1].running_mean, plain[1].running_mean)
    assert torch.equal(fresh[1].aux.running_mean, plain[1].running_mean)

    # timm's SplitBatchNorm2d (num_splits=2) has the same keys: checkpoints move both ways
    theirs = timm_split.convert_splitbn_model(tiny_cnn(seed=2), num_splits=2)
    assert set(theirs.state_dict()) == keys
    model.load_state_dict(theirs.state_dict())
    assert torch.equal(model[1].aux.weight, theirs[1].aux_bn[0].weight)
    theirs.load_state_dict(model.state_dict())


def test_revert_keeps_the_main_bn_and_restores_the_original_keys():
    plain = tiny_cnn()
    model = convert_split_bn_(copy.deepcopy(plain))
    with torch.no_grad():
        model[1].aux.weight.fill_(9.0)
    main_weight = model[1].weight
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    model.eval()
    expected = model(x)
    revert_split_bn_(model)
    assert type(model[1]) is nn.BatchNorm2d and model[1].weight is main_weight
    assert list(model.state_dict()) == list(plain.state_dict())
    assert not model[1].training
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert all(p is not None and not (p == 9.0).all() for p in model.parameters())


def test_conversion_is_idempotent_and_keeps_shared_modules_shared():
    bn = nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Linear(4, 4), bn, nn.Linear(4, 4), bn)
    convert_split_bn_(model)
    assert model[1] is model[3] and isinstance(model[1], SplitBatchNorm1d)
    before = model[1]
    convert_split_bn_(model)
    assert model[1] is before and type(model[1].aux) is nn.BatchNorm1d
    assert len(list(model.parameters())) == 4 + 2 + 2  # two linears, one main and one aux BN


def test_sync_batch_norm_converts_and_routes_in_one_process():
    model = convert_split_bn_(nn.Sequential(nn.SyncBatchNorm(3)))
    assert isinstance(model[0], SplitSyncBatchNorm) and type(model[0].aux) is nn.SyncBatchNorm
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    with bn_route(model, "adv"):
        out = model(x)
    torch.testing.assert_close(out, nn.BatchNorm2d(3)(x), rtol=0, atol=1e-6)
    assert type(revert_split_bn_(model)[0]) is nn.SyncBatchNorm


def test_split_parameters_partitions_the_parameters():
    model = convert_split_bn_(tiny_cnn())
    groups = split_parameters(model)
    ids = [{id(p) for p in group} for group in groups]
    assert set().union(*ids) == {id(p) for p in model.parameters()}
    assert sum(len(s) for s in ids) == len(list(model.parameters()))
    assert ids[1] == {id(model[1].weight), id(model[1].bias)}
    assert ids[2] == {id(model[1].aux.weight), id(model[1].aux.bias)}
    assert split_parameters(tiny_cnn()).clean == []


# ---------------------------------------------------------------------------------------------------- ghost BN


@pytest.mark.parametrize("kind", ["1d", "1d-seq", "2d", "3d"])
@pytest.mark.parametrize("momentum", [0.1, None])
@given(
    seed=st.integers(0, 2**31 - 1),
    groups=st.integers(1, 4),
    per_group=st.integers(2, 4),
    route=st.sampled_from(["clean", "adv"]),
)
@settings(max_examples=30)
def test_ghost_bn_equals_one_bn_per_group_and_moves_running_stats_by_the_group_average(
    kind, momentum, seed, groups, per_group, route
):
    model, main_ref, aux_ref = _pair(kind, seed, momentum=momentum)
    ref = main_ref if route == "clean" else aux_ref
    model.train(), ref.train()
    bn = model[0] if route == "clean" else model[0].aux
    mean0, var0, count0 = bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(groups * per_group, C, *KINDS[kind][1], generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(x.shape, generator=g, dtype=torch.float64)
    with bn_route(model, route), ghost_bn(model, groups=groups):
        out = model(x)
    (out * w).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    outs = [copy.deepcopy(ref)(chunk) for chunk in x_ref.chunk(groups)]  # each group on its own "device"
    ref_out = torch.cat(outs)
    (ref_out * w).sum().backward()
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)
    # running statistics: one update towards the mean over groups of group means and unbiased group variances
    flat = x.detach().reshape(groups, per_group, C, -1).transpose(1, 2).reshape(groups, C, -1)
    factor = 1.0 / (count0 + 1) if momentum is None else momentum
    expected_mean = (1 - factor) * mean0 + factor * flat.mean(2).mean(0)
    torch.testing.assert_close(bn.running_mean, expected_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(bn.running_var, (1 - factor) * var0 + factor * flat.var(2).mean(0), rtol=0, atol=1e-12)
    assert int(bn.num_batches_tracked) == count0 + 1
    assert model[0].ghost_groups == 1  # restored


def test_ghost_bn_with_a_split_route_groups_each_part_and_leaves_eval_mode_alone():
    model, main_ref, aux_ref = _pair("2d", 5)
    x = torch.randn(10, C, 3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with bn_route(model, split=(4, 6)), ghost_bn(model, groups=2):
        out = model(x)
    ref = torch.cat([main_ref(x[:2]), main_ref(x[2:4]), aux_ref(x[4:7]), aux_ref(x[7:])])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    model.eval()
    with ghost_bn(model, groups=5):
        ev = model(x)
    bn = model[0]
    by_hand = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    torch.testing.assert_close(ev, by_hand, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------- bad input


def test_bad_input_raises_named_errors():
    model = convert_split_bn_(tiny_cnn())
    x = torch.rand(4, 3, 8, 8)
    with pytest.raises(ValueError, match="exactly one"):
        with bn_route(model):
            pass
    with pytest.raises(ValueError, match="exactly one"):
        with bn_route(model, "adv", split=(2, 2)):
            pass
    with pytest.raises(ValueError, match="'clean' or 'adv'"):
        with bn_route(model, "noisy"):
            pass
    with pytest.raises(ValueError, match="n_aux must be >= 0"):
        with bn_route(model, split=(2, -1)):
            pass
    with pytest.raises(TypeError, match="n_clean must be an int"):
        with bn_route(model, split=(2.0, 2)):
            pass
    with pytest.raises(ValueError, match=r"batch of 5 rows; got input of shape \(4, 4, 8, 8\)"):
        with bn_route(model, split=(2, 3)):
            model(x)
    with pytest.raises(ValueError, match="convert_split_bn_ first"):
        with bn_route(tiny_cnn(), "adv"):
            pass
    with pytest.raises(ValueError, match="do not divide into 3 groups"):
        with ghost_bn(model, groups=3):
            model(x)
    with pytest.raises(ValueError, match="groups must be >= 1"):
        with ghost_bn(model, groups=0):
            pass
    with pytest.raises(TypeError, match="the model itself is a BatchNorm2d"):
        convert_split_bn_(nn.BatchNorm2d(3))
    with pytest.raises(TypeError, match="must be an nn.Module"):
        convert_split_bn_(lambda t: t)


def test_a_batch_norm_subclass_is_refused_before_anything_is_converted():
    class BatchNormAct(nn.BatchNorm2d):
        def forward(self, x):
            return torch.relu(super().forward(x))

    model = nn.Sequential(nn.BatchNorm2d(3), nn.Sequential(BatchNormAct(3)))
    with pytest.raises(TypeError, match=r"^1\.0: .*BatchNormAct"):
        convert_split_bn_(model)
    assert type(model[0]) is nn.BatchNorm2d  # nothing half-converted
