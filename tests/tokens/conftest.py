"""Fixtures for the token tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Runs a test module on one intra-op thread, then restores the count.

    The tiny ViTs here run thousands of small kernels; fanning each out to several threads costs more than it
    saves, and on a busy 2-core machine the thread hand-offs made these tests up to 50x slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
