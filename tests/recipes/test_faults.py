"""Fault injection against the real recipes, through their launchers (issue 17 item 5; issues 17.3 and 21).

Each fault a user can make is injected on the command line of ``recipes.<recipe>.launch.main`` (with ``--dry-run``:
the checks run, nothing trains) and the outcome is asserted: a non-zero exit and ONE line on stderr naming the key,
the bad value and what is allowed, no traceback, no usage block. Sections:

1. configuration faults (both recipes, one table);
2. device and launcher behaviour (bf16 on CPU, --help, a dry run without the data, the README's SLURM examples);
3. run-directory faults (the toolkit's refusals; the training-level tests live in test_advxl.py / test_fast_advprop.py,
   referenced below, not duplicated);
4. data faults: missing data, too few shards for the workers, a bad-sample budget exceeded.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

import pytest

from advtrain.training import precision_for_device

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ("advxl", "fast_advprop")


def launch(recipe: str):
    return importlib.import_module(f"recipes.{recipe}.launch")


def run_launcher(recipe: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``launch.main(argv)``."""
    code = 0
    try:
        launch(recipe).main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int) and e.code is not None:  # sys.exit("message") prints it to stderr
            print(e.code, file=__import__("sys").stderr)
    out, err = capsys.readouterr()
    return code, out, err


# ================================================================================================ 1. configuration

FAULTS = [
    # (recipe, override, the message's fragment): every one was accepted, failed late or gave a traceback before
    ("advxl", "eval.eps=2.0", "eval.eps: 2.0 is not an l_inf radius in [0, 1) (pixels in [0, 1]); did you mean 2/255"),
    ("advxl", "eval.pgd_steps=-1", "eval.pgd_steps: -1 is not an int >= 0"),
    ("advxl", "eval.pgd_step_size=0", "eval.pgd_step_size: 0.0 is not an l_inf radius in (0, 1)"),
    ("advxl", "eval.resolutions=[32,30]", "eval.resolutions.1: 30 is not divisible by the patch size 4 of"),
    ("advxl", "eval.img_size=30", "eval.img_size: 30 is not divisible by the patch size 4"),
    ("advxl", "data.val_samples=0", "data.val_samples: 0 is not an int >= 1"),
    ("advxl", "data.num_workers=-1", "data.num_workers: -1 is not an int >= 0"),
    ("advxl", "data.batch_size=0", "data.batch_size: 0 is not an int >= 1"),
    ("advxl", "stages.0.attack.eps=2.0", "stages.0.attack.eps: 2.0 is not an l_inf radius"),
    (
        "advxl",
        "stages.1.attack.step_size=4",
        (
            "stages.1.attack.step_size: 4.0 is not an l_inf radius in (0, 1) "
            "(pixels in [0, 1]); did you mean 4/255 = 0.015686?"
        ),
    ),
    (
        "advxl",
        'stages.1.attack={"norm": "l2", "eps": 100, "step_size": 1, "steps": 3}',
        "stages.1.attack.eps: 100.0 is not an l_2 radius in [0, 64]",
    ),
    (
        "advxl",
        'stages.1.attack={"norm": "l1", "eps": 5000, "step_size": 1, "steps": 3}',
        "stages.1.attack.eps: 5000.0 is not an l_1 radius in [0, 4096]",
    ),
    ("advxl", "stages.0.attack.steps=-2", "stages.0.attack.steps: -2 is not an int >= 0"),
    ("advxl", "stages.0.samples=0", "stages.0.samples: 0 is not an int >= 1"),
    ("advxl", "stages.1.img_size=34", "stages.1.img_size: 34 is not divisible by the patch size 4"),
    ("advxl", "stages.0.lr=-1", "stages.0.lr: -1.0 is not a finite number > 0"),
    ("advxl", "optim.lr=fast", "optim.lr: 'fast' is not a float"),
    ("advxl", "optim.lr=0", "optim.lr: 0.0 is not a finite number > 0"),
    ("advxl", "optim.min_lr=1", "optim.min_lr: 1.0 is not in [0, 0.003]"),
    ("advxl", "optim.betas=[0.9,1.5]", "optim.betas.1: 1.5 is not in [0, 1)"),
    ("advxl", "optim.ema_decay=1", "optim.ema_decay: 1.0 is not in (0, 1)"),
    ("advxl", "model.drop_path=1.5", "model.drop_path: 1.5 is not in [0, 1)"),
    ("advxl", "model.num_classes=0", "model.num_classes: 0 is not an int >= 1"),
    ("advxl", "model.std=[0.5,0,0.5]", "model.std.1: 0.0 is not a finite number > 0"),
    ("advxl", "run.checkpoint_every=0", "run.checkpoint_every: 0 is not an int >= 1"),
    ("advxl", "run.log_every=0", "run.log_every: 0 is not an int >= 1"),
    ("advxl", "run.keep_checkpoints=0", "run.keep_checkpoints: 0 is not an int >= 1"),
    ("advxl", "run.threads=0", "run.threads: 0 is not null (torch's default) or an int >= 1"),
    ("advxl", "run.device=gpu", "run.device: 'gpu' is not null, 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    ("advxl", "run.seed=-1", "run.seed: -1 is not an int >= 0"),
    ("advxl", "run.precision=fp16", "run.precision: 'fp16' is not one of ('fp32', 'bf16')"),
    (
        "advxl",
        'clip_text={"tower": "t", "pretrained": null, "templates": ["no slot"]}',
        "clip_text.templates.0: 'no slot' is not a template with a {} for the class name",
    ),
    ("advxl", "stages.7.samples=1", "stages has no item '7' (it has 2)"),
    ("advxl", "optim.learning_rate=1", "no field 'learning_rate' in optim"),
    ("fast_advprop", "adv.eps=2.0", "adv.eps: 2.0 is not an l_inf radius in (0, 1) (pixels in [0, 1]); did you mean"),
    (
        "fast_advprop",
        "adv.eps=8",
        ("adv.eps: 8.0 is not an l_inf radius in (0, 1) (pixels in [0, 1]); did you mean 8/255 = 0.031373?"),
    ),
    ("fast_advprop", "adv.step_size=0", "adv.step_size: 0.0 is not an l_inf radius in (0, 1)"),
    ("fast_advprop", "adv.p_adv=1.5", "adv.p_adv: 1.5 is not in (0, 1]"),
    ("fast_advprop", "adv.beta=0", "adv.beta: 0.0 is not a finite number > 0"),
    ("fast_advprop", "adv.steps=0", "adv.steps: 0 is not an int >= 1"),
    ("fast_advprop", "eval.eps=2.0", "eval.eps: 2.0 is not an l_inf radius in [0, 1)"),
    ("fast_advprop", "eval.pgd_steps=-1", "eval.pgd_steps: -1 is not an int >= 0"),
    ("fast_advprop", "eval.corruption_samples=0", "eval.corruption_samples: 0 is not null (all) or an int >= 1"),
    ("fast_advprop", "eval.evals=0", "eval.evals: 0 is not an int >= 1"),
    ("fast_advprop", "data.val_samples=0", "data.val_samples: 0 is not an int >= 1"),
    ("fast_advprop", "data.num_workers=-1", "data.num_workers: -1 is not an int >= 0"),
    ("fast_advprop", "data.img_size=0", "data.img_size: 0 is not an int >= 1"),
    ("fast_advprop", "data.train_size=0", "data.train_size: 0 is not an int >= 1"),
    ("fast_advprop", "optim.lr=fast", "optim.lr: 'fast' is not a float"),
    ("fast_advprop", "optim.momentum=1", "optim.momentum: 1.0 is not in [0, 1)"),
    ("fast_advprop", "optim.gamma=0", "optim.gamma: 0.0 is not in (0, 1]"),
    ("fast_advprop", "optim.warmup_epochs=40", "optim.warmup_epochs: 40.0 is not in [0, 28)"),
    ("fast_advprop", "optim.weight_decay=-1", "optim.weight_decay: -1.0 is not a finite number >= 0"),
    ("fast_advprop", "run.checkpoint_every=0", "run.checkpoint_every: 0 is not an int >= 1"),
    ("fast_advprop", "run.log_every=0", "run.log_every: 0 is not an int >= 1"),
    ("fast_advprop", "method=fast", "method: 'fast' is not one of ('fast_advprop', 'vanilla', 'advprop')"),
    ("fast_advprop", "adv.bn_groups=3", "adv.bn_groups 3 must divide the clean (64) and attacked (16) rows"),
]


@pytest.mark.parametrize("recipe, item, message", FAULTS, ids=[f"{r}:{i[:40]}" for r, i, _ in FAULTS])
def test_a_configuration_fault_exits_with_one_line_naming_the_key(recipe, item, message, tmp_path, capsys):
    code, out, err = run_launcher(recipe, ["--dry-run", f"run.out_dir={json.dumps(str(tmp_path))}", item], capsys)
    assert code != 0 and out == ""  # nothing resolved is printed, nothing runs
    assert len(err.strip().splitlines()) == 1, err  # one line: no usage block, no traceback
    assert message in err and "configuration error" in err
    assert "Traceback" not in err and "usage:" not in err


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_presets_pass_every_check(recipe):
    config = importlib.import_module(f"recipes.{recipe}.config")
    for name in config.PRESETS:
        assert config.override(config.preset(name), []) == config.preset(name)


# ================================================================================================ 2. device, launcher


def test_bf16_falls_back_to_fp32_on_cpu_unless_asked():
    assert precision_for_device("bf16", device_type="cuda", explicit=False) == ("bf16", None)
    assert precision_for_device("fp32", device_type="cpu", explicit=False) == ("fp32", None)
    precision, notice = precision_for_device("bf16", device_type="cpu", explicit=False)
    assert precision == "fp32" and "falls back" in notice and "\n" not in notice
    precision, warning = precision_for_device("bf16", device_type="cpu", explicit=True)
    assert precision == "bf16" and warning.startswith("warning:") and "\n" not in warning


@pytest.mark.parametrize(
    "recipe, explicit, expected, says",
    [
        ("advxl", [], "fp32", "notice: running on CPU, so run.precision falls back"),
        ("advxl", ["run.precision=bf16"], "bf16", "warning: run.precision=bf16 on CPU as asked"),
        ("fast_advprop", [], "fp32", "notice: running on CPU, so run.precision falls back"),
        ("fast_advprop", ["run.precision=bf16"], "bf16", "warning: run.precision=bf16 on CPU as asked"),
    ],
)
def test_a_cpu_run_of_a_bf16_preset_uses_fp32_with_a_notice(recipe, explicit, expected, says, tmp_path, capsys):
    argv = ["--preset", "imagenette224", "--dry-run", "run.device=cpu", f"run.out_dir={json.dumps(str(tmp_path))}"]
    code, out, err = run_launcher(recipe, argv + explicit, capsys)
    assert code == 0 and json.loads(out)["run"]["precision"] == expected
    assert sum(line.startswith(says) for line in err.splitlines()) == 1


@pytest.mark.parametrize("recipe", RECIPES)
def test_help_lists_every_config_section_and_no_rst(recipe, capsys):
    code, out, _ = run_launcher(recipe, ["--help"], capsys)
    assert code == 0 and "``" not in out and ":func:" not in out and "--dry-run" in out
    config = importlib.import_module(f"recipes.{recipe}.config")
    listed = re.findall(r"^  ([a-z_]+)(?:\.N)?(?: \(null.*?\))?: (.*)$", out, flags=re.MULTILINE)
    sections = {name: keys.split() for name, keys in listed}
    cfg = config.preset("embedded")
    for name, value in vars(cfg).items():
        if hasattr(value, "__dataclass_fields__") or name in ("stages", "clip_text"):
            section = (
                type(cfg.stages[0]) if name == "stages" else (config.ClipText if name == "clip_text" else type(value))
            )
            assert set(section.__dataclass_fields__) <= {*sections.get(name, []), *_continued(out, name)}, name


def _continued(text: str, name: str) -> list[str]:
    """The keys on a section's wrapped continuation lines (indented 6)."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        if re.match(rf"^  {name}(\.N)?( \(.*?\))?: ", line):
            j = i + 1
            while j < len(lines) and lines[j].startswith("      ") and not lines[j].startswith("       "):
                out += lines[j].split()
                j += 1
    return out


@pytest.mark.parametrize("recipe, preset", [("advxl", "imagenet_vit_b16"), ("fast_advprop", "imagenet_resnet50")])
def test_a_dry_run_needs_no_data_and_says_so(recipe, preset, tmp_path, capsys):
    argv = [
        "--preset",
        preset,
        "--dry-run",
        'data.path="/no/such/imagenet"',
        f"run.out_dir={json.dumps(str(tmp_path))}",
    ]
    code, out, err = run_launcher(recipe, argv, capsys)
    assert code == 0 and json.loads(out)["data"]["path"] == "/no/such/imagenet"
    assert (
        "dry run: config checked, the data and other files not read (data.path '/no/such/imagenet' does not "
        "exist" in err
    )
    with pytest.raises(SystemExit) as e:  # the real launch refuses it, before anything is built
        launch(recipe).main(argv[:2] + argv[3:])
    assert "configuration error: data.path '/no/such/imagenet' does not exist" in str(e.value)


def _slurm_examples() -> list[tuple[str, str]]:
    """``(readme, command)`` for every ``--cluster slurm`` command in the READMEs (continuation lines joined)."""
    found = []
    for readme in [ROOT / "README.md", *sorted(ROOT.glob("recipes/*/README.md"))]:
        text = readme.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            if "--cluster slurm" in line and "recipes." in line and "launch" in line:
                found.append((str(readme.relative_to(ROOT)), line.split("#", 1)[0].strip().strip("`")))
    return found


@pytest.mark.parametrize("readme, command", _slurm_examples())
def test_the_readme_slurm_examples_preview_without_data_and_give_a_time_limit(readme, command, tmp_path, capsys):
    argv = shlex.split(command)
    recipe = next(a.split(".")[1] for a in argv if a.startswith("recipes.") and a.endswith(".launch"))
    assert "--time" in argv, f"{readme}: {command}"  # the 60 min default stops an ImageNet job after 4 allocations
    argv = argv[argv.index(f"recipes.{recipe}.launch") + 1 :]
    argv = [a for a in argv if not a.startswith("run.out_dir=") and a != "--dry-run"]
    code, out, err = run_launcher(recipe, argv + ["--dry-run", f"run.out_dir={json.dumps(str(tmp_path))}"], capsys)
    assert code == 0, err
    assert "#SBATCH --time" in out and "nothing was submitted" in err


# ================================================================================================ 3. run directory
# The toolkit's run-directory refusals, as the recipes meet them (not repeated here):
# - a run directory holding another config is refused, naming the fields (launcher, one line):
#   tests/recipes/test_advxl.py::test_a_changed_override_on_a_rerun_exits_with_the_differing_fields
# - no usable checkpoint: refused, and --fresh moves the old run aside and starts a clean log:
#   tests/recipes/test_advxl.py::test_no_usable_checkpoint_is_refused_and_fresh_starts_a_clean_log (slow)
# - a torn last metrics line is dropped on resume:
#   tests/recipes/test_advxl.py::test_a_torn_last_metrics_line_is_dropped_on_resume (slow)
# - checkpoints of another world size: test_advxl.py (ResumeError "written by 2 process(es)")
# - the toolkit level: tests/training/test_run_dir.py, tests/training/test_metrics.py


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_run_directory_of_another_config_is_refused_in_one_line_by_a_dry_run_too(recipe, tmp_path, capsys):
    out_dir = f"run.out_dir={json.dumps(str(tmp_path))}"
    module = launch(recipe)
    cfg, _ = module.parse(["--preset", "embedded", out_dir])
    for sub in (module.runs(cfg) if recipe == "advxl" else module.baselines(cfg)).values():
        Path(sub.run.out_dir).mkdir(parents=True, exist_ok=True)
        Path(sub.run.out_dir, "config.json").write_text(sub.to_json())
    code, _, err = run_launcher(recipe, ["--dry-run", out_dir, "run.seed=7"], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1 and "run.seed 0 -> 7" in err and "--fresh" in err


# ================================================================================================ 4. data
# Data faults through the launcher, on small shard folders built here. The bad-sample path inside a run (a corrupt
# JPEG and a sample without .cls skipped and counted in metrics.jsonl) is
# tests/recipes/test_fast_advprop.py::test_streamed_shards_with_bad_samples_train_and_count_them; every bad-data
# kind of advtrain.data itself is in tests/data/test_sources.py.


def _jpeg(i: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 36), (25 * i % 256, 60, 200 - 7 * i)).save(buf, "JPEG")
    return buf.getvalue()


def _shards(root: Path, *, n_train: int, bad: int = 0, per_shard: int = 40) -> Path:
    """``n_train`` train shards and 2 val shards of ``per_shard`` JPEGs; train images 5 to 5 + ``bad`` corrupt."""
    import io
    import tarfile

    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", 2)):
        for s in range(n):
            with tarfile.open(root / f"{split}-{s:04d}.tar", "w") as tar:
                for i in range(per_shard):
                    corrupt = split == "train" and 5 <= s * per_shard + i < 5 + bad  # the first decodes (checks)
                    members = {"jpg": b"\xff\xd8 broken" if corrupt else _jpeg(i), "cls": str(i % 10).encode()}
                    for ext, data in members.items():
                        info = tarfile.TarInfo(f"{split}{s}_{i:03d}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    return root


def _fast_advprop_on(root: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--preset",
        "embedded",
        "data.kind=wds",
        f"data.path={root}",
        "data.img_size=32",
        "data.batch_size=20",
        "data.val_samples=20",
        "eval.corruptions=[]",
        f"run.out_dir={tmp_path / 'run'}",
        *extra,
    ]


def test_a_missing_data_path_is_one_line_before_training(tmp_path, capsys):
    code, out, err = run_launcher("fast_advprop", _fast_advprop_on(tmp_path / "nowhere", tmp_path), capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1 and "nowhere" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was trained


def test_too_few_shards_for_the_workers_is_found_before_training(tmp_path, capsys):
    root = _shards(tmp_path / "shards", n_train=2)
    code, out, err = run_launcher("fast_advprop", _fast_advprop_on(root, tmp_path, "data.num_workers=3"), capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert re.search(r"shard", err) and re.search(r"3", err)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_bad_sample_budget_exceeded_stops_the_run_in_one_line_naming_the_shard(tmp_path, capsys):
    # 30 of 160 train images corrupt, far over a 0.1% budget: the run stops at a log step, naming train-0000
    root = _shards(tmp_path / "shards", n_train=4, bad=30)
    argv = _fast_advprop_on(root, tmp_path, "data.train_size=1200", "run.log_every=10")
    code, out, err = run_launcher("fast_advprop", argv, capsys)
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code != 0 and "Traceback" not in err
    assert len(lines) == 1 and "budget" in lines[0] and "train-0000.tar" in lines[0], err[-2000:]


def test_corruption_evaluation_without_its_extra_names_the_extra_before_training(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "imagecorruptions", None)  # as if advtrain[corruptions] were not installed
    code, out, err = run_launcher("fast_advprop", ["--preset", "embedded", "run.out_dir=/nonexistent/run"], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1 and "advtrain[corruptions]" in err, err
