"""What both recipes' configs share: every preset round-trips through JSON, and the run section is the toolkit's."""

from __future__ import annotations

import importlib

import pytest

from advtrain.training import RunConfig


@pytest.mark.parametrize("recipe", ["advxl", "fast_advprop"])
def test_every_preset_round_trips_through_json(tmp_path, recipe):
    config = importlib.import_module(f"recipes.{recipe}.config")
    assert len(config.PRESETS) >= 4
    for name in config.PRESETS:
        cfg = config.preset(name)
        path = tmp_path / f"{name}.json"
        path.write_text(cfg.to_json())
        assert config.load_config(path) == cfg, name
        assert isinstance(cfg.run, RunConfig) and cfg.run.out_dir.startswith("runs/")
