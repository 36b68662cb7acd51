"""cross_entropy: hard labels, soft targets (timm MixUp/CutMix), label smoothing, per-sample output."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy

from advtrain.losses import cross_entropy


def _logits_and_labels(seed: int, b: int, k: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, k, generator=g, dtype=torch.float64).mul(3).to(dtype)
    y = torch.randint(0, k, (b,), generator=g)
    return z, y


def _naive(z: torch.Tensor, q: torch.Tensor) -> list[float]:
    """-sum_k q_k log softmax(z)_k, one sample at a time, in Python floats."""
    out = []
    for zi, qi in zip(z.double().tolist(), q.double().tolist()):
        m = max(zi)
        lse = m + math.log(sum(math.exp(v - m) for v in zi))
        out.append(-sum(qk * (zk - lse) for zk, qk in zip(zi, qi)))
    return out


@given(
    seed=st.integers(0, 2**31 - 1),
    b=st.integers(1, 6),
    k=st.integers(1, 7),
    smoothing=st.sampled_from([0.0, 0.1, 0.5]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
@settings(max_examples=100)
def test_soft_one_hot_equals_hard_labels(seed, b, k, smoothing, dtype):
    z, y = _logits_and_labels(seed, b, k, dtype)
    one_hot = torch.nn.functional.one_hot(y, k).to(dtype)
    hard = cross_entropy(z, y, label_smoothing=smoothing, reduction="none")
    soft = cross_entropy(z, one_hot, label_smoothing=smoothing, reduction="none")
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(soft, hard, rtol=tol, atol=tol)


@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 5), k=st.integers(1, 6), smoothing=st.floats(0.0, 0.9))
def test_soft_targets_match_a_naive_loop(seed, b, k, smoothing):
    z, _ = _logits_and_labels(seed, b, k)
    q = torch.rand(b, k, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) + 1e-3
    q = q / q.sum(1, keepdim=True)
    smoothed = q * (1 - smoothing) + smoothing / k
    got = cross_entropy(z, q, label_smoothing=smoothing, reduction="none")
    torch.testing.assert_close(got, torch.tensor(_naive(z, smoothed), dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_timm_mixup_targets(smoothing):
    """timm's mixup_target at lam=1 is label smoothing; mixed targets agree with timm's SoftTargetCrossEntropy."""
    z, y = _logits_and_labels(0, 8, 5, torch.float32)
    t = mixup_target(y, 5, lam=1.0, smoothing=smoothing)
    torch.testing.assert_close(cross_entropy(z, t), cross_entropy(z, y, label_smoothing=smoothing))
    t = mixup_target(y, 5, lam=0.7, smoothing=smoothing)  # y mixed with y.flip(0), as timm's MixUp/CutMix does
    torch.testing.assert_close(cross_entropy(z, t), SoftTargetCrossEntropy()(z, t))


def test_reductions_and_per_sample_shape():
    z, y = _logits_and_labels(3, 6, 4)
    per = cross_entropy(z, y, reduction="none")
    assert per.shape == (6,)
    torch.testing.assert_close(cross_entropy(z, y, reduction="mean"), per.mean())
    torch.testing.assert_close(cross_entropy(z, y, reduction="sum"), per.sum())
    torch.testing.assert_close(per, torch.nn.functional.cross_entropy(z, y, reduction="none"))


def test_soft_gradient_is_softmax_minus_target():
    z, _ = _logits_and_labels(5, 4, 3)
    z.requires_grad_(True)
    q = torch.softmax(torch.randn(4, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64), 1)
    (grad,) = torch.autograd.grad(cross_entropy(z, q, reduction="sum"), z)
    torch.testing.assert_close(grad, torch.softmax(z.detach(), 1) - q)


def test_low_precision_logits_compute_in_float32():
    z, y = _logits_and_labels(1, 4, 3, torch.bfloat16)
    out = cross_entropy(z, y, reduction="none")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, cross_entropy(z.float(), y, reduction="none"))


@pytest.mark.parametrize(
    ("logits", "target", "kw", "error"),
    [
        (torch.zeros(4), torch.zeros(4, dtype=torch.long), {}, ValueError),  # 1-D logits
        (torch.zeros(4, 3), torch.zeros(5, dtype=torch.long), {}, ValueError),  # batch mismatch
        (torch.zeros(4, 3), torch.zeros(4, 2), {}, ValueError),  # soft targets of the wrong width
        (torch.zeros(4, 3), torch.zeros(4, 3, 1), {}, ValueError),
        (torch.zeros(4, 3), torch.zeros(4), {}, TypeError),  # float labels
        (torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.long), {}, TypeError),  # integer soft targets
        (torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), {"label_smoothing": 1.0}, ValueError),
        (torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), {"reduction": "batchmean"}, ValueError),
    ],
)
def test_bad_input_raises(logits, target, kw, error):
    with pytest.raises(error):
        cross_entropy(logits, target, **kw)
