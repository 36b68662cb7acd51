"""The public surface of advtrain.losses: every name exported, documented, and its doctest runs."""

from __future__ import annotations

import doctest
import importlib
import inspect

import pytest

import advtrain.losses

MODULES = [
    "advtrain.losses._captions",
    "advtrain.losses._contrastive",
    "advtrain.losses._cross_entropy",
    "advtrain.losses._gather",
    "advtrain.losses._text_tower",
    "advtrain.losses._zero_shot",
]


def test_all_is_exactly_the_public_names():
    public = {n for n in dir(advtrain.losses) if not n.startswith("_")} - {m.rsplit(".", 1)[1] for m in MODULES}
    assert set(advtrain.losses.__all__) == public
    assert advtrain.losses.__all__ == sorted(advtrain.losses.__all__)


@pytest.mark.parametrize("name", advtrain.losses.__all__)
def test_each_function_and_class_is_documented(name):
    obj = getattr(advtrain.losses, name)
    if not (inspect.isfunction(obj) or inspect.isclass(obj)):
        return  # constants
    doc = inspect.getdoc(obj)
    assert doc and doc.splitlines()[0].strip(), f"{name} has no one-line summary"
    assert "Example:" in doc, f"{name} has no Example"


@pytest.mark.parametrize("module", MODULES)
def test_doctests(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0
