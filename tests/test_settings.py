"""Each command's --settings: typed, documented from the config schema, checked in one line."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from vitplasticity import cli, settings
from vitplasticity.config import check_config
from vitplasticity.errors import UserError


@pytest.mark.parametrize("command", sorted(settings.COMMANDS))
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
    given = {"model": "m", "task": "t", "reference_task": "r", "n_pairs": 10}
    built = settings.build("plasticity", given)
    assert built == settings.Plasticity(model="m", task="t", reference_task="r", n_pairs=10, modes=["embedding"])
    assert settings.params(built) == given | {"modes": ["embedding"]}  # loader_batch absent, as given
    assert settings.build("prepare", {"name": "x", "data": {"source": "imagefolder"}}).data["split_seed"] == 42
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.n_pairs = 20
    with pytest.raises(UserError) as unknown:
        settings.build("probe", {"model": "m", "task": "t", "maxiter": 3})
    assert str(unknown.value) == ("--settings of `vitplasticity probe`: unknown key(s) 'maxiter'; "
                                  "allowed: model, task, max_iter")
    with pytest.raises(UserError) as missing:
        settings.build("finetune", {"model": "m", "task": "t", "arm": "mha", "components": ["mha"], "lr": 0.1,
                                    "seed": 0, "steps": 10, "eval_every": 5})
    assert str(missing.value) == ("--settings of `vitplasticity finetune` lacks 'batch_size' (Effective batch size "
                                  "(accumulation reaches it)); add it (see vitplasticity finetune --help)")


@pytest.mark.parametrize("command", sorted(settings.COMMANDS))
def test_each_settings_field_names_a_config_key_and_no_section_key_is_left_out(command):
    """The dataclasses are the jobs' interface and the schema the config's: a field names a key the schema
    has (or one the workflow adds), and a job reading a section gets every key of it but those it drops."""
    cls = settings.COMMANDS[command]
    sources = [settings.source(cls, field) for field in dataclasses.fields(cls)]
    for path in sources:
        assert " " in path or settings.node(path), path
    if hasattr(cls, "SECTION"):
        section = set(settings.node(cls.SECTION)["properties"])
        assert section - {field.name for field in dataclasses.fields(cls)} == set(getattr(cls, "DROPPED", ()))
    for field in dataclasses.fields(cls):
        assert field.default in (dataclasses.MISSING, None), f"{command}.{field.name}: a default outside the schema"


def test_the_workflow_hands_a_job_the_keys_of_its_dataclass():
    """What `for_job` makes of the smoke study (whose `snakemake -p` shows the same JSON): each section key
    the job reads with its filled default, the job's names, and nothing it drops (seeds, enabled)."""
    config = yaml.safe_load((Path(__file__).parent / "data" / "smoke.yaml").read_text())
    config["controls"] = {"mha_as_ln1": {"component": "mha", "match": "ln1"}}
    check_config(config)
    names = {"model": "vit_smoke", "task": "novel", "arm": "mha_as_ln1"}
    assert settings.for_job("finetune", config, names, optimizer="sgd", components=["mha"], selection=None, lr=0.01,
                            seed=0) == {
        "model": "vit_smoke", "task": "novel", "arm": "mha_as_ln1", "components": ["mha"],
        "control": {"component": "mha", "match": "ln1", "mask_seed": 0}, "lr": 0.01, "seed": 0, "optimizer": "sgd",
        "steps": 8, "eval_every": 4, "batch_size": 32, "warmup_steps": 2, "clip_norm": 1.0, "crop_scale": [0.08, 1.0],
        "momentum": 0.9, "weight_decay": 0.0, "betas": [0.9, 0.999]}
    assert settings.for_job("criteria", config, names) == {"model": "vit_smoke", "task": "novel", "n_pairs": 1000,
                                                           "gradient_batches": 4, "gradient_batch_size": 32, "seed": 0}
    assert settings.for_job("pretrain", config, {"model": "vit_smoke"}) == {
        "model": "vit_smoke", "task": "source", "steps": 30, "eval_every": 15, "batch_size": 32, "lr": 0.003,
        "optimizer": "adamw", "weight_decay": 0.05, "warmup_steps": 5, "betas": [0.9, 0.999], "seed": 0,
        "crop_scale": [0.08, 1.0], "timm_name": "vit_tiny_patch16_224",
        "kwargs": config["models"]["vit_smoke"]["kwargs"], "img_size": 16, "clip_norm": 1.0}
    built = settings.build("finetune", settings.for_job("finetune", config, names | {"arm": "mha"}, optimizer="sgd",
                                                        components=["mha"], selection=None, lr=0.01, seed=0))
    assert built.control is None and built.selection is None and built.momentum == 0.9


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
    assert settings.build("aggregate", passed).arm_order == ["mha", "all"]


def test_the_schema_ships_with_the_package():
    """Jobs and `recommend` read the schema from the installed package, never from a source checkout:
    it lies in the package's data folder, which the wheel's package data includes."""
    import tomllib

    import vitplasticity

    assert Path(vitplasticity.__file__).parent / "data" / "config.schema.yaml" == settings.SCHEMA
    assert settings.SCHEMA.is_file()
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "data/*.yaml" in pyproject["tool"]["setuptools"]["package-data"]["vitplasticity"]
