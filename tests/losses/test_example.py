"""examples/clip_text_contrastive.py end to end: the contrastive loss against the frozen text tower goes down."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_clip_text_example_trains_against_the_frozen_tower(shared_datasets):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run(
        [
            sys.executable,
            "examples/clip_text_contrastive.py",
            "--data",
            str(shared_datasets / "mnist"),
            "--steps",
            "30",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", r.stdout)]
    assert len(losses) >= 5, r.stdout
    assert losses[-1] < losses[0] - 1.0  # measured 2026-12-01: 5.54 -> 3.37 over 30 steps
    clean, robust = (float(v) / 100 for v in re.search(r"clean (\d+\.\d)%, .*?(\d+\.\d)%", r.stdout).groups())
    assert 0.2 < clean and robust <= clean  # chance is 10%; measured 52.3% clean, 49.4% under PGD-5
