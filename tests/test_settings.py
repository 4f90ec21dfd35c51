"""Each command's --settings: documented from the config schema, checked in one line."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitplasticity import cli, settings
from vitplasticity.errors import UserError


@pytest.mark.parametrize("command", sorted(settings.KEYS))
def test_help_lists_every_settings_key_with_type_and_default(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = capsys.readouterr().out
    for key in settings.fields(command):
        assert f"\n  {key} (" in text


def test_help_line_comes_from_the_schema():
    text = settings.help_text("plasticity")
    assert "  n_pairs (integer, required): Image pairs per (model, task)." in text.splitlines()
    assert "  batch_size (integer, default 64): Pairs per batch." not in text  # a machine setting (runtime)
    assert "    data.split_seed (integer, default 42): Seed of the fixed random splits." in (
        settings.help_text("prepare").splitlines())


def test_defaults_are_filled_and_bad_keys_are_one_line():
    filled = settings.check("plasticity", {"model": "m", "task": "t", "reference_task": "r", "n_pairs": 10})
    assert "batch_size" not in filled and filled["modes"] == ["embedding"]
    assert settings.check("prepare", {"name": "x", "data": {"source": "imagefolder"}})["data"]["split_seed"] == 42
    with pytest.raises(UserError) as unknown:
        settings.check("probe", {"model": "m", "task": "t", "maxiter": 3})
    assert str(unknown.value) == ("--settings of `vitplasticity probe`: unknown key(s) 'maxiter'; "
                                  "allowed: model, task, max_iter")


def test_prepare_of_an_image_folder_needs_no_raw_folder_nor_seed(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(5):
            pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{i}.png")
    task = {"name": "mine", "data": {"source": "imagefolder", "path": str(tmp_path / "images"), "store_size": 16}}
    result = subprocess.run([sys.executable, "-m", "vitplasticity.cli", "prepare", "--settings", json.dumps(task),
                             "--out", str(tmp_path / "prepared")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "prepared" / "meta.json").read_text())
    assert meta["splits"] == {"train": 6, "val": 2, "test": 2} and meta["provenance"]["split_seed"] == 42


def test_a_missing_key_is_one_line_naming_it(tmp_path, capsys):
    code = cli.main(["prepare", "--settings", '{"name": "x"}', "--out", str(tmp_path / "prepared")])
    assert code == 2
    assert capsys.readouterr().err == (
        "vitplasticity prepare: error: --settings of `vitplasticity prepare` lacks 'data' (Where the task's "
        "images come from and how they are split); add it (see vitplasticity prepare --help)\n")


def test_aggregate_accepts_the_arm_order_the_workflow_passes():
    """common.smk passes the config's arm order (settings JSON sorts the arms' keys)."""
    passed = {"experiment": "main", "model": "m", "tasks": ["t"], "optimizer": "sgd",
              "arms": {"mha": ["mha"], "all": ["emb", "mha"]}, "arm_order": ["mha", "all"]}
    assert settings.check("aggregate", passed)["arm_order"] == ["mha", "all"]


def test_the_schema_ships_with_the_package():
    """Jobs and `recommend` read the schema from the installed package, never from a source checkout:
    it lies in the package's data folder, which the wheel's package data includes."""
    import tomllib

    import vitplasticity

    assert Path(vitplasticity.__file__).parent / "data" / "config.schema.yaml" == settings.SCHEMA
    assert settings.SCHEMA.is_file()
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "data/*.yaml" in pyproject["tool"]["setuptools"]["package-data"]["vitplasticity"]
