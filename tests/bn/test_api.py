"""The public surface of advtrain.bn: exports, docstring sections, and the docstring examples, run as doctests."""

from __future__ import annotations

import doctest
import inspect

import pytest

import advtrain.bn
from advtrain.bn import _shuffle, _split

FUNCTIONS = [n for n in advtrain.bn.__all__ if inspect.isfunction(getattr(advtrain.bn, n))]


def test_every_export_exists():
    assert sorted(advtrain.bn.__all__) == advtrain.bn.__all__
    for name in advtrain.bn.__all__:
        obj = getattr(advtrain.bn, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__, name


@pytest.mark.parametrize("name", FUNCTIONS)
def test_docstrings_have_the_house_sections(name):
    doc = inspect.getdoc(getattr(advtrain.bn, name))
    summary = doc.splitlines()[0]
    assert summary.endswith(".") and len(summary) <= 120, summary
    for section in ("Args:", "Returns:", "Raises:", "Example:"):
        assert section in doc, (name, section)
    if name.endswith("_") or name in ("bn_route", "ghost_bn"):
        assert "Side effects:" in doc, name
    assert "Writes ``.grad``" not in doc, name  # only advtrain.recycle writes .grad


@pytest.mark.parametrize("module", [_split, _shuffle], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result
