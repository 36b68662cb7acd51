"""Smoke test of examples/reduced_tokens_attack.py, shortened: 300 digits, one epoch per stage."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "reduced_tokens_attack.py"


@pytest.mark.usefixtures("one_thread")
def test_reduced_tokens_example_runs(monkeypatch):
    spec = importlib.util.spec_from_file_location("reduced_tokens_attack", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    full = example.digits

    def few_digits(generator):
        x_train, y_train, x_test, y_test = full(generator)
        return x_train[:300], y_train[:300], x_test[:100], y_test[:100]

    monkeypatch.setattr(example, "digits", few_digits)
    monkeypatch.setattr(example, "BATCH", 100)
    monkeypatch.setattr(example, "EVAL_STEPS", 2)
    out = example.main(coarse_epochs=1, fine_epochs=1)
    assert math.isfinite(out["coarse_loss"]) and math.isfinite(out["fine_loss"])
    assert 0.0 <= out["robust"] <= out["clean"] + 0.05 and 0.0 <= out["clean"] <= 1.0
