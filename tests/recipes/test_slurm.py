"""Integration tests against a real SLURM cluster (``../shared/tools/slurm_up.sh``; ``.ci/run`` brings it up).

- a 2-task CPU job of the AdvXL embedded preset (gloo DDP) matches a single-process run with the same global batch;
- a job preempted after its first checkpoint is requeued, resumes from that checkpoint and ends with the same
  weights as an uninterrupted run;
- a job whose training raises reports the error back to the launching command.

Without a cluster these tests skip with a message; under CI (``CI=true``) or ``ADVTRAIN_REQUIRE_SLURM=1`` they fail
instead, so that CI cannot pass by skipping them. Every test gets its own submitit folder: job ids restart after a
cluster purge, and submitit keys its files by job id.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from recipes import cluster
from recipes.advxl import launch as advxl_launch
from recipes.advxl import train
from recipes.advxl.config import preset

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

ROOT = Path(__file__).resolve().parents[2]
SCHEDULE_TIMEOUT_S = 600


def _cluster_problem() -> str | None:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "no SLURM client (sbatch/sinfo) on PATH"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    if r.returncode or not re.search(r"\b(idle|mix|alloc)\b", r.stdout):
        return f"no usable SLURM node (sinfo: {(r.stdout + r.stderr).strip() or 'nothing'})"
    r = subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True, text=True, timeout=30)
    if r.returncode:
        return f"SLURM accounting is off (submitit needs sacct to see job states): {r.stderr.strip()}"
    return None


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    problem = _cluster_problem()
    if problem:
        msg = f"{problem}; bring one up with `sudo bash ../shared/tools/slurm_up.sh`"
        if os.environ.get("CI") == "true" or os.environ.get("ADVTRAIN_REQUIRE_SLURM") == "1":
            pytest.fail(msg)
        pytest.skip(msg)


def embedded(out_dir: Path):
    """The AdvXL embedded-default preset, two-stage run only (no one-stage or standard-training twin)."""
    cfg = preset("embedded")
    run = dataclasses.replace(cfg.run, out_dir=str(out_dir), compare_standard=False, compare_one_stage=False, threads=1)
    return dataclasses.replace(cfg, run=run)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted single-process run of the embedded preset, in this process (~95 s on one core)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = train.main(embedded(out))
    assert result["finished"]
    return out, result


def submit(cfg, *argv: str):
    """Submits through the launcher's own code path, detached; returns the submitit job."""
    _, args = advxl_launch.parse(["--cluster", "slurm", "--detach", *argv])
    return cluster.launch("advxl", cfg, args, check=advxl_launch.check)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def final_weights(run_dir: Path) -> dict:
    latest = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))[-1]
    return torch.load(latest, map_location="cpu", weights_only=True)["model"]


def scontrol_job(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout


def wait_until(what: str, predicate, timeout_s: float = SCHEDULE_TIMEOUT_S, poll_s: float = 0.2):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def test_two_task_gloo_job_matches_the_single_process_run(reference, tmp_path):
    ref_dir, ref = reference
    job = submit(embedded(tmp_path / "ddp"), "--tasks-per-node", "2", "--cpus-per-task", "1")
    result = cluster.follow(job, poll_s=1.0)
    assert result["finished"]
    assert json.loads((tmp_path / "ddp" / "meta.json").read_text())["world_size"] == 2
    # Same global batch of 64 (32 per rank, the same 64 images per step as one process), same augmentations;
    # only the attacks' random starts differ per rank. Stated tolerances:
    #   the first logged loss (same weights, same batch, an eps ramp still near 0): within 1e-5;
    #   the mean of the logged training losses: within 0.02;
    #   clean and PGD-20 top-1 at each stage's end (450 validation images): within 3 points.
    # Measured on 2026-12-01 (2 cores): first loss 1.2e-7 apart, means 1.6241 vs 1.6214, fine stage clean
    # 89.33 vs 89.78 and PGD-20 46.22 vs 46.22, coarse stage PGD-20 55.78 vs 57.11.
    # Not re-measured since the preset changed (2026-12-02: eps ramp 24,000 samples, every stage evaluated at 32 px,
    # so the coarse stage now reads ~7% PGD-20): no SLURM controller was reachable from that session.
    a = [r["loss"] for r in rows(ref_dir) if r["kind"] == "train"]
    b = [r["loss"] for r in rows(tmp_path / "ddp") if r["kind"] == "train"]
    assert len(a) == len(b)
    assert abs(a[0] - b[0]) < 1e-5
    assert abs(sum(a) / len(a) - sum(b) / len(b)) < 0.02
    assert len(result["evals"]) == len(ref["evals"]) == 2
    for r_ref, r_job in zip(ref["evals"], result["evals"]):
        assert r_ref["samples"] == r_job["samples"] and r_ref["n"] == r_job["n"]
        for key in ("clean", "pgd20"):
            assert abs(r_ref[key] - r_job[key]) <= 0.03, (r_ref["stage"], key, r_ref[key], r_job[key])
    assert ref["evals"][-1]["clean"] > 0.5  # both runs learned: the comparison is not between two chance models


def test_preempted_job_resumes_from_its_checkpoint_and_ends_with_the_same_weights(reference, tmp_path):
    ref_dir, _ = reference
    run_dir = tmp_path / "preempted"
    job = submit(embedded(run_dir))
    first = wait_until(
        "the job's first checkpoint after step 0",
        lambda: [  # a new run also writes one at step 0
            p for p in sorted((run_dir / "checkpoints").glob("ckpt-*.pt")) if int(p.stem.split("-")[1]) > 0
        ],
    )
    # preempt through the signal submitit handles (SIGTERM, then USR2): its handler calls RecipeJob.checkpoint
    # and requeues the job with `scontrol requeue`
    job._interrupt()
    wait_until(
        "the requeued job to be pending",
        lambda: re.search(r"JobState=PENDING", scontrol_job(job.job_id)) and "Restarts=1" in scontrol_job(job.job_id),
    )
    # a requeued job waits ~2 minutes (its begin time) unless its StartTime is reset
    subprocess.run(["scontrol", "update", f"JobId={job.job_id}", "StartTime=now"], check=True, timeout=30)
    result = cluster.follow(job, poll_s=1.0)
    assert result["finished"]
    log = Path(str(job.paths.stdout)).read_text()
    assert "preempted or timed out: requeueing" in log
    resumed = re.findall(r"resuming from (\S+) \((\d+) samples seen\)", log)
    assert resumed, log[-2000:]
    assert int(resumed[0][1]) >= int(first[0].stem.split("-")[1])  # it resumed from a checkpoint, not from scratch
    # no duplicated steps in the metrics after the resume
    steps = [r["step"] for r in rows(run_dir) if r["kind"] == "train"]
    assert steps == sorted(set(steps))
    ref_w, got = final_weights(ref_dir), final_weights(run_dir)
    assert ref_w.keys() == got.keys() and all(torch.equal(ref_w[k], got[k]) for k in ref_w)


def test_failing_job_reports_its_error_to_the_launching_command(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "recipes.advxl.launch",
        "--cluster",
        "slurm",
        f'run.out_dir="{tmp_path / "bad"}"',
        "run.compare_standard=false",
        "run.compare_one_stage=false",
        "optim.lr=1e12",
        "optim.clip_grad=null",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=SCHEDULE_TIMEOUT_S)
    assert r.returncode != 0
    assert re.search(r"submitted advxl as job \d+", r.stdout)
    assert "failed" in r.stderr and "FloatingPointError: loss is" in r.stderr
    assert "--- tail of" in r.stderr  # the tail of the job's log follows the error
