"""The public surface and every docstring example."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import advtrain

MODULES = sorted(m.name for m in pkgutil.walk_packages(advtrain.__path__, "advtrain."))


def test_top_level_reexports():
    from advtrain import cross_entropy, fgsm, pgd, project, resize_reduce  # noqa: F401

    for name in advtrain.__all__:
        assert callable(getattr(advtrain, name)), name


@pytest.mark.parametrize("name", [m for m in MODULES if not m.rsplit(".", 1)[-1].startswith("_")])
def test_public_packages_declare_all(name):
    module = importlib.import_module(name)
    assert hasattr(module, "__all__"), f"{name} has no __all__"
    for symbol in module.__all__:
        assert hasattr(module, symbol), f"{name}.__all__ names {symbol}, which does not exist"


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"
