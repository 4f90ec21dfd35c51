"""Pretraining keeps the weights of the steps the config names (the pretraining trajectory)."""

import json

import pandas as pd
import pytest
from safetensors.torch import load_file

from vitplasticity import jobs, settings
from vitplasticity.datasets.sources import prepare_task
from vitplasticity.errors import UserError
from vitplasticity.machine import Runtime, Tracking

SETTINGS = {"model": "vit", "timm_name": "vit_tiny_patch16_224", "img_size": 16,
            "kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2},
            "steps": 4, "eval_every": 2, "batch_size": 8, "lr": 0.003, "optimizer": "adamw", "seed": 0}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks") / "source"
    data = {"source": "synthetic", "kind": "source", "image_size": 16, "n_train": 16, "n_val": 8, "n_test": 8,
            "seed": 0}
    prepare_task("source", data, folder, folder.parent / "raw")
    return folder


def test_kept_steps_are_checkpoints_with_their_step_and_validation_accuracy(source, tmp_path):
    run_dir = tmp_path / "run"
    jobs.pretrain(settings.check("pretrain", SETTINGS | {"keep_steps": [2, 4]}), Runtime(), source,
                  tmp_path / "vit.safetensors", run_dir, Tracking(enabled=False))
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert kept == ["step_2.json", "step_2.safetensors", "step_4.json", "step_4.safetensors"]
    val_acc = pd.read_csv(run_dir / "history.csv").set_index("step")["val_acc"]
    for step in (2, 4):
        record = json.loads((run_dir / "checkpoints" / f"step_{step}.json").read_text())
        assert record["provenance"] | {"val_acc": None} == {
            "kind": "pretrain", "task": "source", "step": step, "steps": 4, "seed": 0, "val_acc": None}
        assert record["provenance"]["val_acc"] == pytest.approx(val_acc[step])
        assert record["arch"]["kwargs"]["img_size"] == 16
        assert "pos_embed" in load_file(str(run_dir / "checkpoints" / f"step_{step}.safetensors"))


def test_a_kept_step_off_the_evaluation_grid_is_one_line_before_any_output(source, tmp_path):
    with pytest.raises(UserError) as error:
        jobs.pretrain(settings.check("pretrain", SETTINGS | {"keep_steps": [3]}), Runtime(), source,
                      tmp_path / "vit.safetensors", tmp_path / "run", Tracking(enabled=False))
    assert str(error.value) == ("keep_steps [3] must be multiples of eval_every (2) up to steps (4); "
                                "change models.*.pretrain.keep_steps")
    assert not (tmp_path / "run").exists() and not (tmp_path / "vit.safetensors").exists()
