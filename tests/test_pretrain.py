"""Pretraining keeps the weights of every evaluation (the pretraining trajectory), also across a resume."""

import json
import shutil

import pandas as pd
import pytest
from safetensors.torch import load_file

from vitplasticity import jobs, settings
from vitplasticity.datasets.sources import prepare_task
from vitplasticity.errors import UserError
from vitplasticity.machine import Runtime

SETTINGS = {"model": "vit", "task": "source", "timm_name": "vit_tiny_patch16_224", "img_size": 16,
            "kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2},
            "steps": 5, "eval_every": 2, "batch_size": 8, "lr": 0.003, "optimizer": "adamw", "seed": 0}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks") / "source"
    data = {"source": "synthetic", "kind": "source", "image_size": 16, "n_train": 16, "n_val": 8, "n_test": 8,
            "seed": 0}
    prepare_task("source", data, folder, folder.parent / "raw")
    return folder


def pretrain(source, folder, overrides=None):
    return jobs.pretrain(settings.build("pretrain", SETTINGS | (overrides or {})), Runtime(), source,
                         folder / "vit.safetensors", folder / "run")


class Interrupted(Exception):
    pass


def interrupted_pretrain(source, folder, step: int, before_saving: bool = False) -> None:
    """Pretrain until the weights of evaluation `step` are kept (or, `before_saving`, about to be), then stop."""
    original = jobs.models.save_checkpoint

    def interrupt(weights, model, record):
        if not before_saving:
            original(weights, model, record)
        if record["provenance"].get("step") == step:
            raise Interrupted
        if before_saving:
            original(weights, model, record)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jobs.models, "save_checkpoint", interrupt)
        with pytest.raises(Interrupted):
            pretrain(source, folder)


def test_every_evaluation_is_kept_with_its_step_and_validation_accuracy(source, tmp_path):
    pretrain(source, tmp_path)
    run_dir = tmp_path / "run"
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert kept == [f"step_{step}.{suffix}" for step in (2, 4, 5) for suffix in ("json", "safetensors")]
    assert not (run_dir / "checkpoints.partial").exists()
    val_acc = pd.read_csv(run_dir / "history.csv").set_index("step")["val_acc"]
    for step in (2, 4, 5):
        record = json.loads((run_dir / "checkpoints" / f"step_{step}.json").read_text())
        assert record["provenance"] | {"val_acc": None} == {
            "kind": "pretrain", "task": "source", "step": step, "steps": 5, "seed": 0, "val_acc": None}
        assert record["provenance"]["val_acc"] == pytest.approx(val_acc[step])
        assert record["arch"]["kwargs"]["img_size"] == 16
        assert "pos_embed" in load_file(str(run_dir / "checkpoints" / f"step_{step}.safetensors"))
    # The last kept weights are the run's last step; the checkpoint itself is the best validation step's.
    last = load_file(str(run_dir / "checkpoints" / "step_5.safetensors"))
    assert set(last) == set(load_file(str(tmp_path / "vit.safetensors")))


def test_a_resumed_run_keeps_the_weights_saved_before_the_interruption(source, tmp_path):
    """An interrupted run leaves state.pt and checkpoints.partial/ (Snakemake deletes the outputs of a failed
    job, checkpoints/ among them); the resumed run publishes the earlier steps' weights with its own."""
    whole = tmp_path / "whole"
    pretrain(source, whole)
    cut = tmp_path / "cut"
    interrupted_pretrain(source, cut, step=4)
    assert (cut / "run" / "state.pt").exists() and not (cut / "run" / "checkpoints").exists()
    pretrain(source, cut)
    for step in (2, 4, 5):
        resumed = load_file(str(cut / "run" / "checkpoints" / f"step_{step}.safetensors"))
        straight = load_file(str(whole / "run" / "checkpoints" / f"step_{step}.safetensors"))
        assert all(resumed[name].equal(straight[name]) for name in straight), step


def test_an_interruption_between_the_state_and_the_kept_weights_keeps_them_on_resume(source, tmp_path):
    """The state of step 4 is saved before its weights are kept: a run killed in between resumes at step 4
    and keeps them then, from the resumed model."""
    whole = tmp_path / "whole"
    pretrain(source, whole)
    cut = tmp_path / "cut"
    interrupted_pretrain(source, cut, step=4, before_saving=True)
    assert not (cut / "run" / "checkpoints.partial" / "step_4.safetensors").exists()
    pretrain(source, cut)
    resumed = load_file(str(cut / "run" / "checkpoints" / "step_4.safetensors"))
    straight = load_file(str(whole / "run" / "checkpoints" / "step_4.safetensors"))
    assert resumed.keys() == straight.keys() and all(resumed[name].equal(straight[name]) for name in straight)
    record = json.loads((cut / "run" / "checkpoints" / "step_4.json").read_text())
    assert record["provenance"]["val_acc"] == json.loads(
        (whole / "run" / "checkpoints" / "step_4.json").read_text())["provenance"]["val_acc"]


def test_weights_lost_with_an_interruption_are_one_line(source, tmp_path):
    interrupted_pretrain(source, tmp_path, step=4)
    (tmp_path / "run" / "checkpoints.partial" / "step_2.json").unlink()
    with pytest.raises(UserError) as error:
        pretrain(source, tmp_path)
    assert str(error.value) == (
        f"the kept weights step_2.json of an interrupted earlier run are missing from {tmp_path}/run/"
        f"checkpoints.partial; delete {tmp_path}/run/state.pt and run the pretraining again")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "vit.safetensors").exists()
    # Said when the run resumes, before it trains on: no later step's weights were kept.
    assert not (tmp_path / "run" / "checkpoints.partial" / "step_5.safetensors").exists()


def test_a_run_that_fails_after_publishing_its_weights_resumes(source, tmp_path):
    """Snakemake deletes a failed job's outputs, checkpoints/ among them: the scratch copies must outlive them."""
    def fail(*args):
        raise Interrupted

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jobs, "_write_run_folder", fail)
        with pytest.raises(Interrupted):
            pretrain(source, tmp_path)
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # as Snakemake does
    pretrain(source, tmp_path)
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == [f"step_{step}.{suffix}" for step in (2, 4, 5) for suffix in ("json", "safetensors")]
    assert not (tmp_path / "run" / "checkpoints.partial").exists()


def test_the_trajectory_steps_are_no_pretraining_setting():
    """Changing keep_steps must not rerun pretraining (and with it every finetuning run)."""
    with pytest.raises(UserError, match="^--settings of `vitplasticity pretrain`: unknown key\\(s\\) 'keep_steps'"):
        settings.build("pretrain", SETTINGS | {"keep_steps": [2]})
