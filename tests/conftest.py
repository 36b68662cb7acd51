"""Shared fixtures and the hypothesis profiles.

Profiles: ``ci`` (the default: derandomized, no deadline, 200 examples per property) and ``dev``
(``HYPOTHESIS_PROFILE=dev``: 30 random examples, for quick local iterations).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=200, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# One intra-op thread: the tests run thousands of tiny kernels, where fanning out costs more than it saves, and
# on a busy 2-core machine thread hand-offs made them up to 50x slower.
torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATASETS = SHARED / "datasets"


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """``../shared/datasets``; the test is skipped with a message when it is absent."""
    if not (DATASETS / "mnist" / "manifest.json").exists():
        pytest.skip(f"../shared/datasets not found at {DATASETS}: this test needs the project's shared data")
    return DATASETS
