"""Fixtures for the loss tests: one tiny random-init text tower per session (offline, see tests/conftest.py)."""

from __future__ import annotations

import pytest

from advtrain.losses import FrozenTextTower, tiny_text_tower


@pytest.fixture(scope="session")
def tower() -> FrozenTextTower:
    return tiny_text_tower(seed=0)
