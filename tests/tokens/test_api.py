"""The public surface of advtrain.tokens, its docstrings, and their examples (run as doctests)."""

from __future__ import annotations

import doctest
import importlib
import inspect

import pytest

import advtrain.tokens as tokens

PUBLIC = {
    "MaskedTokens",
    "block_mask",
    "block_shape",
    "gather_tokens",
    "num_kept",
    "random_mask",
    "resample_vit_",
    "resize_reduce",
    "sample_block_indices",
    "sample_random_indices",
    "vit_forward_tokens",
}
MODULES = ["_indices", "_mask", "_resize", "_vit"]
SCIENTIFIC = {"keep_ratio"}  # hyperparameters that every call site states: keyword-only, no default


def test_surface():
    assert set(tokens.__all__) == PUBLIC
    assert all(getattr(tokens, name).__module__.startswith("advtrain.tokens._") for name in PUBLIC)


@pytest.mark.parametrize("name", sorted(PUBLIC - {"MaskedTokens"}))
def test_signatures_and_docstrings(name):
    fn = getattr(tokens, name)
    params = inspect.signature(fn).parameters
    for p in params.values():
        if p.name in SCIENTIFIC:
            assert p.kind is p.KEYWORD_ONLY and p.default is p.empty, (name, p)
        if p.default is not p.empty:
            assert p.kind is p.KEYWORD_ONLY, (name, p)  # options are keyword-only
    doc = inspect.getdoc(fn)
    summary = doc.splitlines()[0]
    assert summary.endswith(".") and len(summary) <= 120, summary
    for section in ("Args:", "Returns:", "Raises:", "Example:", "References:"):
        assert section in doc, (name, section)
    assert "arXiv" in doc.split("References:")[1]


def test_in_place_surgery_ends_in_an_underscore():
    assert "Side effects:" in inspect.getdoc(tokens.resample_vit_)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module):
    mod = importlib.import_module(f"advtrain.tokens.{module}")
    result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, result


def test_importing_the_reducers_does_not_import_timm():
    import subprocess
    import sys

    code = "import sys, advtrain.tokens; assert 'timm' not in sys.modules, 'timm imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)
