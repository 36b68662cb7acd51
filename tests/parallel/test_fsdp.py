"""Single-process parts of advtrain.parallel's FSDP helpers: block discovery, checkpointing, the checks."""

from __future__ import annotations

import pytest
import timm
import torch

from advtrain.attacks import detach_params
from advtrain.parallel import (
    broadcast_buffers_,
    check_fsdp_compatible,
    checkpoint_blocks_,
    find_blocks,
    is_sharded,
    mixed_precision_policy,
    shard_model_,
    unwrap,
)
from tests.parallel import _jobs


def test_find_blocks_in_vits_convnexts_resnets_and_wrappers():
    vit = _jobs.make_model()
    assert find_blocks(vit) == list(vit.inner.blocks) and len(find_blocks(vit)) == 2
    assert unwrap(detach_params(vit)) is vit.inner
    convnext = timm.create_model("convnext_atto", num_classes=10)
    assert find_blocks(convnext) == list(convnext.stages) and len(find_blocks(convnext)) == 4
    resnet = timm.create_model("resnet10t", num_classes=10)
    assert find_blocks(resnet) == [resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4]
    with pytest.raises(ValueError, match="no blocks, stages or layer1..layer4 found in Linear"):
        find_blocks(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name", ["vit", "resnet10t"])
def test_checkpointed_blocks_give_the_same_outputs_gradients_and_keys(name):
    make = (
        (lambda: _jobs.make_model())
        if name == "vit"
        else (lambda: (torch.manual_seed(0), timm.create_model("resnet10t", num_classes=10))[1])
    )
    ref, ck = make(), make()
    keys = list(ck.state_dict())
    wrapped = checkpoint_blocks_(ck)
    assert len(wrapped) == len(find_blocks(ref)) and list(ck.state_dict()) == keys
    # a parent's named_parameters() shows the wrapper (the wrapper's own strips it); state_dict keys never do
    clean = [n.replace("_checkpoint_wrapped_module.", "") for n, _ in ck.named_parameters()]
    assert clean == [n for n, _ in ref.named_parameters()]
    ck.load_state_dict(ref.state_dict())
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for m in (ref, ck):
        m.train()
        m(x).logsumexp(1).sum().backward()
    for (n, a), (_, b) in zip(ref.named_parameters(), ck.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=n)
    with pytest.raises(ValueError, match="checkpointed already"):
        checkpoint_blocks_(ck)
    with pytest.raises(ValueError, match="is not a submodule"):
        checkpoint_blocks_(ref, blocks=[torch.nn.Linear(2, 2)])


def test_fsdp_compatibility_check_names_what_needs_ddp():
    from advtrain.bn import convert_split_bn_

    resnet = timm.create_model("resnet10t", num_classes=10)
    check_fsdp_compatible(resnet, recycling=False, compile=False)  # plain BatchNorm is allowed
    with pytest.raises(ValueError, match=r"split BatchNorm .* use run.parallel=ddp \(found \d+, e.g. 'bn1'\)"):
        check_fsdp_compatible(convert_split_bn_(resnet), recycling=False, compile=False)
    with torch.device("meta"):
        vit = timm.create_model("vit_giant_patch14_224")  # a config-time check costs no memory
    check_fsdp_compatible(vit, recycling=False, compile=False)
    with pytest.raises(ValueError, match="gradient recycling"):
        check_fsdp_compatible(vit, recycling=True, compile=False)
    with pytest.raises(ValueError, match="torch.compile with FSDP"):
        check_fsdp_compatible(vit, recycling=False, compile=True)


def test_sharding_needs_a_process_group_and_a_known_precision():
    model = _jobs.make_model()
    with pytest.raises(RuntimeError, match="init_process_group"):
        shard_model_(model, precision="fp32")
    assert not is_sharded(model)
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        mixed_precision_policy("fp16")
    block, root = mixed_precision_policy("fp32")
    assert block.param_dtype is None and root.output_dtype is None


def test_broadcast_buffers_without_a_process_group_changes_nothing():
    bn = torch.nn.BatchNorm1d(3)
    bn.running_mean.fill_(2.0)
    broadcast_buffers_(bn)
    assert torch.equal(bn.running_mean, torch.full((3,), 2.0))


def test_a_checkpoint_of_a_checkpointed_model_loads_into_a_plain_one(tmp_path):
    from advtrain.parallel import load_checkpoint, save_checkpoint

    ck = _jobs.make_model(seed=1)
    checkpoint_blocks_(ck)
    opt = _jobs.make_optimizer(ck)
    _jobs.train(ck, opt, steps=range(1))
    p = save_checkpoint(tmp_path / "ckpt-1", model=ck, optimizer=opt)
    plain = _jobs.make_model(seed=2)
    plain_opt = _jobs.make_optimizer(plain)
    load_checkpoint(p, model=plain, optimizer=plain_opt)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), ck.state_dict().values()))
    assert _jobs.train(plain, plain_opt, steps=range(1, 2)) == pytest.approx(
        _jobs.train(ck, opt, steps=range(1, 2)), rel=1e-6
    )
