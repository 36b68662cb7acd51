"""The public surface of advtrain.recycle: the only writers of ``.grad`` say so; the examples run as doctests."""

from __future__ import annotations

import doctest
import inspect

import pytest

import advtrain.recycle
from advtrain.recycle import _recycle

FUNCTIONS = [n for n in advtrain.recycle.__all__ if inspect.isfunction(getattr(advtrain.recycle, n))]


def test_every_export_exists():
    assert sorted(advtrain.recycle.__all__) == advtrain.recycle.__all__
    for name in advtrain.recycle.__all__:
        assert getattr(advtrain.recycle, name).__doc__, name


@pytest.mark.parametrize("name", FUNCTIONS)
def test_docstrings_have_the_house_sections(name):
    doc = inspect.getdoc(getattr(advtrain.recycle, name))
    for section in (
        "Args:",
        "Raises:" if name != "maybe_no_sync" else "Args:",
        "Example:",
        "References:",
        "Side effects:",
    ):
        assert section in doc, (name, section)
    assert "Returns:" in doc or name == "scale_grads_", name  # scale_grads_ returns None


@pytest.mark.parametrize("name", ["recycled_step", "scale_grads_", "sync_update_speed_"])
def test_the_gradient_writers_document_it(name):
    side_effects = inspect.getdoc(getattr(advtrain.recycle, name)).split("Side effects:")[1]
    assert "Writes ``.grad``" in side_effects, name


def test_docstring_examples_run():
    result = doctest.testmod(_recycle, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result
