"""Shuffle-BN permutations: rows that share a source never share a group; inversion; determinism; bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from advtrain.bn import invert_permutation, shuffle_permutation


def _groups_of(perm: torch.Tensor, sources: torch.Tensor, groups: int) -> list[list[int]]:
    return [g.tolist() for g in sources[perm].view(groups, -1)]


@given(
    seed=st.integers(0, 2**31 - 1), groups=st.integers(1, 6), per_group=st.integers(1, 6), n_sources=st.integers(1, 12)
)
@settings(max_examples=200)
def test_rows_of_one_source_are_dealt_as_evenly_as_possible_over_the_groups(seed, groups, per_group, n_sources):
    n = groups * per_group
    g = torch.Generator().manual_seed(seed)
    sources = torch.randint(0, n_sources, (n,), generator=g) * 7 - 3  # arbitrary ids, any multiplicities
    perm = shuffle_permutation(sources, groups=groups, generator=g)
    assert perm.dtype == torch.int64 and torch.equal(perm.sort().values, torch.arange(n))
    for source in sources.unique():
        c = int((sources == source).sum())
        per = torch.tensor([row.count(int(source)) for row in _groups_of(perm, sources, groups)])
        assert int(per.sum()) == c
        assert int(per.min()) >= c // groups and int(per.max()) <= -(-c // groups)  # floor / ceil
        assert int((per > 0).sum()) == min(c, groups)


@given(seed=st.integers(0, 2**31 - 1), groups=st.integers(2, 8), n_src=st.integers(1, 16))
def test_no_group_holds_an_example_together_with_its_adversarial_twin(seed, groups, n_src):
    n_src = n_src * groups  # [x; x_adv]: 2 * n_src rows in groups of 2 * n_src / groups
    sources = torch.arange(2 * n_src) % n_src
    perm = shuffle_permutation(sources, groups=groups, generator=torch.Generator().manual_seed(seed))
    for row in _groups_of(perm, sources, groups):
        assert len(set(row)) == len(row)


@given(seed=st.integers(0, 2**31 - 1), groups=st.integers(2, 6), per_group=st.integers(1, 6))
def test_regrouping_separates_rows_that_shared_a_group(seed, groups, per_group):
    n = groups * per_group
    before = torch.arange(n) // per_group  # the group each row was normalized in (the attack's forward)
    perm = shuffle_permutation(before, groups=groups, generator=torch.Generator().manual_seed(seed))
    for row in _groups_of(perm, before, groups):
        counts = torch.bincount(torch.tensor(row), minlength=groups)
        assert int(counts.max()) <= -(-per_group // groups)


def test_the_generator_decides_and_every_row_reaches_every_group_uniformly():
    sources = torch.arange(8)
    a = shuffle_permutation(sources, groups=2, generator=torch.Generator().manual_seed(0))
    b = shuffle_permutation(sources, groups=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(1)
    hits = torch.zeros(8, 2)
    positions = torch.zeros(8, 8)
    for _ in range(800):
        perm = shuffle_permutation(sources, groups=2, generator=g)
        where = invert_permutation(perm)  # where each row went
        hits[torch.arange(8), where // 4] += 1
        positions[torch.arange(8), where] += 1
    assert hits.min() > 330 and hits.max() < 470  # 400 expected per (row, group)
    assert positions.min() > 60 and positions.max() < 145  # 100 expected per (row, position)


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 30))
def test_invert_permutation_undoes_the_permutation(seed, n):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    x = torch.randn(n, 3, generator=g)
    inv = invert_permutation(perm)
    assert torch.equal(x[perm][inv], x) and torch.equal(x[inv][perm], x)


def test_bad_input_raises_named_errors():
    with pytest.raises(ValueError, match="6 rows do not divide into 4 equal groups"):
        shuffle_permutation(torch.arange(6), groups=4)
    with pytest.raises(ValueError, match="groups must be >= 1"):
        shuffle_permutation(torch.arange(6), groups=0)
    with pytest.raises(TypeError, match="groups must be an int"):
        shuffle_permutation(torch.arange(6), groups=2.0)
    with pytest.raises(TypeError, match="integer ids; got dtype torch.float32"):
        shuffle_permutation(torch.zeros(6), groups=2)
    with pytest.raises(ValueError, match=r"sources must be \(n,\); got shape \(2, 3\)"):
        shuffle_permutation(torch.zeros(2, 3, dtype=torch.int64), groups=2)
    with pytest.raises(ValueError, match="not a permutation of 0..2"):
        invert_permutation(torch.tensor([0, 0, 2]))
    with pytest.raises(TypeError, match="integer tensor"):
        invert_permutation(torch.tensor([0.0, 1.0]))
