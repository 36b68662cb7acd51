"""The submitit launcher without a cluster: options, dry runs, bad options, and a job through the local executor."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from recipes import cluster
from recipes.advxl import launch as advxl_launch
from recipes.advxl import train
from recipes.fast_advprop import launch as fast_launch
from tests.recipes.test_advxl import tiny


def test_options_become_executor_parameters():
    _, args = advxl_launch.parse(
        [
            "--cluster",
            "slurm",
            "--nodes",
            "2",
            "--gpus-per-node",
            "8",
            "--cpus-per-task",
            "12",
            "--partition",
            "gpu",
            "--account",
            "proj",
            "--time",
            "2880",
            "--mem-gb",
            "400",
            "--sbatch",
            "qos=high",
            "--sbatch=--mem-per-gpu=80G",
        ]
    )
    p = cluster.executor_parameters(args, name="advxl")
    assert p == dict(
        name="advxl",
        timeout_min=2880,
        nodes=2,
        tasks_per_node=8,
        gpus_per_node=8,
        cpus_per_task=12,
        mem_gb=400,
        slurm_partition="gpu",
        slurm_account="proj",
        slurm_additional_parameters={"qos": "high", "mem_per_gpu": "80G"},
    )


def test_cpus_per_task_default_to_the_loader_workers_plus_one(tmp_path):
    cfg = tiny(tmp_path)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=6))
    _, args = advxl_launch.parse(["--cluster", "slurm", "--gpus-per-node", "8"])
    assert cluster.executor_parameters(args, name="advxl", cfg=cfg)["cpus_per_task"] == 7
    _, args = advxl_launch.parse(["--cluster", "slurm", "--cpus-per-task", "3"])
    assert cluster.executor_parameters(args, name="advxl", cfg=cfg)["cpus_per_task"] == 3  # given: kept


def test_a_requeued_fresh_job_resumes_instead_of_starting_over_again(tmp_path):
    cfg = tiny(tmp_path)
    job = cluster.RecipeJob("advxl", dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, fresh=True)))
    assert job.checkpoint().function.cfg == cfg  # fresh=False: the requeued job picks up its checkpoints


def test_cpu_job_asks_for_no_gpus():
    _, args = advxl_launch.parse(["--cluster", "slurm", "--tasks-per-node", "2"])
    p = cluster.executor_parameters(args, name="advxl")
    assert p["tasks_per_node"] == 2 and "gpus_per_node" not in p  # "--gpus-per-node=0" is rejected without gres


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--cluster", "slurm", "--gpus-per-node", "4", "--tasks-per-node", "2"], "one process per GPU"),
        (["--cluster", "local", "--nodes", "2"], "--nodes must be 1"),
        (["--cluster", "local", "--partition", "gpu"], "--cluster slurm only"),
        (["--cluster", "slurm", "--sbatch", "qos"], "KEY=VALUE"),
        (["--cluster", "slurm", "--time", "0"], "--time must be >= 1"),
    ],
)
def test_bad_options_are_refused_by_name(argv, match):
    _, args = advxl_launch.parse(argv)
    with pytest.raises(ValueError, match=match):
        cluster.executor_parameters(args, name="advxl")


def test_batch_that_does_not_split_over_the_processes_exits_before_submitting(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        advxl_launch.main(
            [
                "--cluster",
                "slurm",
                "--tasks-per-node",
                "3",
                "--job-dir",
                str(tmp_path / "jobs"),
                f"run.out_dir={json.dumps(str(tmp_path / 'run'))}",
            ]
        )
    assert "must divide evenly over 3 processes" in str(exc.value)
    assert not (tmp_path / "jobs").exists()  # nothing was submitted


@pytest.mark.parametrize("launcher, recipe", [(advxl_launch, "advxl"), (fast_launch, "fast_advprop")])
def test_dry_run_prints_the_sbatch_script_and_submits_nothing(launcher, recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    launcher.main(
        [
            "--cluster",
            "slurm",
            "--nodes",
            "2",
            "--gpus-per-node",
            "4",
            "--cpus-per-task",
            "8",
            "--partition",
            "gpu",
            "--account",
            "proj",
            "--time",
            "120",
            "--sbatch",
            "qos=high",
            "--sbatch=--mem-per-gpu=80G",
            "--dry-run",
            'run.out_dir="runs/x"',
        ]
    )
    out = capsys.readouterr().out
    head, script = out.split("# sbatch script that would be submitted:")
    info = json.loads(head)
    assert info["world_size"] == 8 and info["config"]["run"]["out_dir"] == str(tmp_path / "runs" / "x")  # absolute
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --time=120",
        "#SBATCH --qos=high",
        "#SBATCH --mem-per-gpu=80G",
        f"#SBATCH --job-name={recipe}",
        "#SBATCH --signal=USR2@",
    ):
        assert line in script, line
    assert "srun" in script and "submitit.core._submit" in script
    assert not (tmp_path / "runs").exists()


def test_job_object_requeues_itself_on_checkpoint(tmp_path):
    job = cluster.RecipeJob("advxl", tiny(tmp_path))
    delayed = job.checkpoint()
    again = delayed.function
    assert isinstance(again, cluster.RecipeJob) and again.recipe == "advxl" and again.cfg == job.cfg
    assert delayed.args == () and delayed.kwargs == {}


def test_summary_drops_weights_and_tensors():
    s = cluster._summary({"final_weights": {"w": torch.ones(2)}, "evals": [{"clean": 0.5}], "t": torch.tensor([1.0])})
    assert s == {"evals": [{"clean": 0.5}], "t": [1.0]}


@pytest.mark.slow
def test_local_executor_runs_the_same_job_and_returns_its_summary(tmp_path, capsys):
    cfg = tiny(tmp_path)
    _, args = advxl_launch.parse(["--cluster", "local"])
    result = cluster.launch("advxl", cfg, args, check=advxl_launch.check)
    reference = train.main(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=str(tmp_path / "ref"))))
    out = capsys.readouterr().out
    assert "submitted advxl as job" in out and "finished" in out and "results.md" in out
    assert result["finished"] and "final_weights" not in result
    # one process, same config and thread count: the job's evaluation equals the in-process run's
    assert result["evals"] == reference["evals"]


@pytest.mark.slow
def test_local_executor_reports_a_failing_job(tmp_path):
    cfg = tiny(tmp_path)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=1e12, clip_grad=None))
    _, args = advxl_launch.parse(["--cluster", "local"])
    with pytest.raises(cluster.JobFailed, match="FloatingPointError"):
        cluster.launch("advxl", cfg, args, check=advxl_launch.check)


def test_a_refused_submission_exits_with_the_reason(tmp_path, monkeypatch):
    fake = tmp_path / "bin"
    fake.mkdir()
    sbatch = fake / "sbatch"  # an sbatch that refuses, as one does when the controller is down
    sbatch.write_text(
        "#!/bin/sh\necho 'sbatch: error: Batch job submission failed: Invalid partition name' >&2\nexit 1\n"
    )
    sbatch.chmod(0o755)
    srun = fake / "srun"  # submitit only builds a SLURM executor where srun exists; this machine may have none
    srun.write_text("#!/bin/sh\nexit 0\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:/usr/bin:/bin")
    with pytest.raises(SystemExit) as exc:
        advxl_launch.main(["--cluster", "slurm", "--partition", "nope", f'run.out_dir="{tmp_path / "run"}"'])
    assert "could not submit the advxl job" in str(exc.value) and "Invalid partition name" in str(exc.value)


def test_without_srun_a_dry_run_still_prints_the_script_and_a_submission_says_why_not(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # a laptop: no SLURM client at all
    advxl_launch.main(["--cluster", "slurm", "--partition", "gpu", "--dry-run", f'run.out_dir="{tmp_path / "run"}"'])
    assert "#SBATCH --partition=gpu" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        advxl_launch.main(["--cluster", "slurm", f'run.out_dir="{tmp_path / "run"}"'])
    assert "could not set up a slurm submission of advxl" in str(exc.value) and "srun" in str(exc.value)
