"""Bad input, the catalogue: malformed configs and files, each stopped with one line that names the
cause and the fix, with no traceback, nothing written and no code run from a file."""

from __future__ import annotations

import copy
import json
import pickle
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import snakemake, write_config
from jobkit import CKPT, ENV, SIDECAR, SMOKE, TASK, cli_command, finetune_argv, run_cli, snapshot

from vitplasticity import jobs
from vitplasticity.config import check_config
from vitplasticity.errors import UserError
from vitplasticity.fileio import sha256_file
from vitplasticity.settings import SCHEMA

pytestmark = pytest.mark.reliability



def _edit(config: dict, path: str, value) -> None:
    *parents, last = path.split("/")
    node = config
    for key in parents:
        node = node[key]
    node[last] = value


# name -> (config path to change, new value, the message)
CONFIG_CASES = {
    "unknown task in an experiment": ("experiments/main/tasks", ["novel", "nvel"],
        "config key 'experiments.main.tasks': unknown task 'nvel'; allowed: source, novel, sketch"),
    "unknown model in an experiment": ("experiments/main/model", "vit_big",
        "config key 'experiments.main.model': unknown model 'vit_big'; allowed: vit_smoke"),
    "unknown arm in an experiment": ("experiments/main/arms", ["mha", "mlp"],
        "config key 'experiments.main.arms': unknown arm 'mlp'; allowed: all, mha, ln1, smooth, non_smooth"),
    "unknown component in an arm": ("arms/mha", ["attention"],
        "config key 'arms.mha.0': 'attention' is not allowed; allowed values: emb, ln1, mha, ln2, fc1, fc2"),
    "misspelt key": ("tasks/novel/step", 8,
        "config key 'tasks.novel': unknown key(s) 'step'; allowed keys: data, eval_every, lrs, steps"),
    "steps of the wrong type": ("tasks/novel/steps", "eight",
        "config key 'tasks.novel.steps': 'eight' is not of type 'integer'; write a value of type integer"),
    "lr grid that is not a list": ("tasks/novel/lrs", 0.01,
        "config key 'tasks.novel.lrs': 0.01 is not of type 'array'; write a value of type list"),
    "empty lr grid": ("tasks/novel/lrs", [],
        "config key 'tasks.novel.lrs': must not be empty; list at least one value"),
    "empty seed list": ("finetune/seeds", [],
        "config key 'finetune.seeds': must not be empty; list at least one value"),
    "negative steps": ("tasks/novel/steps", -5,
        "config key 'tasks.novel.steps': -5 is less than the minimum of 1; set it to at least 1"),
    "zero steps": ("tasks/novel/steps", 0,
        "config key 'tasks.novel.steps': 0 is less than the minimum of 1; set it to at least 1"),
    "zero pretraining steps": ("models/vit_smoke/pretrain/steps", 0,
        "config key 'models.vit_smoke.pretrain.steps': 0 is less than the minimum of 1; set it to at least 1"),
    "zero learning rate": ("tasks/novel/lrs", [0],
        "config key 'tasks.novel.lrs.0': 0 is less than or equal to the minimum of 0; set it to more than 0"),
    "eval period beyond steps": ("tasks/novel/eval_every", 9,
        "config key 'tasks.novel.eval_every': 9 exceeds steps (8); set it to at most steps"),
    "image size not divisible by the patch size": ("models/vit_smoke/img_size", 20,
        "config key 'models.vit_smoke.img_size': 20 is not divisible by the patch size 8; choose a multiple of 8"),
    "unknown optimizer": ("experiments/main/optimizer", "adam",
        "config key 'experiments.main.optimizer': 'adam' is not allowed; allowed values: sgd, adamw"),
}
# Also run through `snakemake`: the end-to-end path, before any job.
CONFIG_CASES_THROUGH_SNAKEMAKE = ["empty lr grid", "zero steps", "image size not divisible by the patch size"]


def _unlink(rel: str):
    return lambda root: (root / rel).unlink()


def _truncate(rel: str, keep: int):
    def damage(root):
        path = root / rel
        path.write_bytes(path.read_bytes()[:keep])
    return damage


def _flip_last_byte(rel: str):
    def damage(root):
        path = root / rel
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    return damage


def _edit_json(rel: str, change: Callable[[dict], object]):
    def damage(root):
        path = root / rel
        record = json.loads(path.read_text())
        record = change(record) or record
        path.write_text(json.dumps(record))
    return damage


def _reseal(root: Path) -> None:
    """Make the sidecar's sha256 match the weights file again (a consistent but bad checkpoint)."""
    _edit_json(SIDECAR, lambda r: r.update(sha256=sha256_file(root / CKPT)))(root)


class Trap:
    """Unpickling this creates the file `path`: proof that a loader ran code from a file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _pickle_as_checkpoint(root: Path) -> None:
    (root / CKPT).write_bytes(pickle.dumps({"blocks.0.attn.qkv.weight": Trap(root / "PWNED")}))
    _reseal(root)


def _object_array_as_labels(root: Path) -> None:
    path = root / TASK / "val_labels.npy"
    np.save(path, np.array([Trap(root / "PWNED")] * 64, dtype=object), allow_pickle=True)
    _edit_json(f"{TASK}/meta.json", lambda m: m["checksums"].update({path.name: sha256_file(path)}))(root)


def _other_architecture(root: Path) -> None:
    _edit_json(SIDECAR, lambda r: r["arch"]["kwargs"].update(embed_dim=64))(root)


def _imagenet_argv(path: str | None):
    def argv(root):
        data = {"source": "imagenet_val", "store_size": 16, "split_seed": 0}
        if path is not None:
            data["path"] = str(root / path)
        return ["prepare", "--settings", json.dumps({"name": "imagenet_val", "data": data}),
                "--out", str(root / "data" / "prepared" / "imagenet_val"), "--raw", str(root / "data" / "raw")]
    return argv


def _aggregate_argv(root: Path) -> list[str]:
    settings = {"experiment": "main", "model": "vit", "tasks": ["novel"], "arms": {"mha": ["mha"]},
                "arm_order": ["mha"]}
    return ["aggregate", "--settings", json.dumps(settings),
            "--runs", str(root / "results" / "runs" / "mha" / "metrics.json"),
            "--out-dir", str(root / "results" / "tables")]


def _nothing(root: Path) -> None:
    pass


# name -> (damage, argv, the message; {task} {ckpt} {sidecar} {root} stand for paths in the copy)
FILE_CASES = {
    "prepared array missing": (_unlink(f"{TASK}/train_images.npy"), finetune_argv,
        "vitplasticity finetune: error: {task}/train_images.npy is missing; delete {task} and prepare it again"),
    "prepared array truncated": (_truncate(f"{TASK}/train_images.npy", 5000), finetune_argv,
        "vitplasticity finetune: error: {task}/train_images.npy does not match its checksum in meta.json; "
        "delete {task} and prepare it again"),
    "prepared array with a wrong checksum": (_flip_last_byte(f"{TASK}/val_images.npy"), finetune_argv,
        "vitplasticity finetune: error: {task}/val_images.npy does not match its checksum in meta.json; "
        "delete {task} and prepare it again"),
    "prepared array holding pickled objects": (_object_array_as_labels, finetune_argv,
        "vitplasticity finetune: error: {task}/val_labels.npy is truncated or corrupt (Array can't be "
        "memory-mapped: Python objects in dtype.); delete {task} and prepare it again"),
    "prepared folder without meta.json": (_unlink(f"{TASK}/meta.json"), finetune_argv,
        "vitplasticity finetune: error: {task} is not a prepared task (no meta.json); run its prepare_dataset rule"),
    "meta.json that is not JSON": (lambda root: (root / TASK / "meta.json").write_text("{"), finetune_argv,
        "vitplasticity finetune: error: {task}/meta.json is not valid JSON (Expecting property name enclosed in "
        "double quotes: line 1 column 2 (char 1)); delete {task} and prepare it again"),
    "task whose classes disagree with its arrays": (
        _edit_json(f"{TASK}/meta.json", lambda m: m.update(classes=m["classes"][:3])), finetune_argv,
        "vitplasticity finetune: error: {task}/train: labels span 0..4 but meta.json lists 3 classes; "
        "delete {task} and prepare it again"),
    "task whose split sizes disagree with its arrays": (
        _edit_json(f"{TASK}/meta.json", lambda m: m["splits"].update(train=100)), finetune_argv,
        "vitplasticity finetune: error: {task}/train: meta.json says 100 samples, arrays hold 128 images and "
        "128 labels; delete {task} and prepare it again"),
    "checkpoint corrupted": (_flip_last_byte(CKPT), finetune_argv,
        "vitplasticity finetune: error: checkpoint {ckpt} does not match the sha256 in its sidecar; "
        "delete both files and fetch it again"),
    "checkpoint truncated": (lambda root: (_truncate(CKPT, 500)(root), _reseal(root)), finetune_argv,
        "vitplasticity finetune: error: checkpoint {ckpt} is not a readable safetensors file (Error while "
        "deserializing header: invalid header length); delete it and fetch it again"),
    "checkpoint that is a pickle": (_pickle_as_checkpoint, finetune_argv,
        "vitplasticity finetune: error: checkpoint {ckpt} is not a readable safetensors file (Error while "
        "deserializing header: header too large); delete it and fetch it again"),
    "checkpoint of another architecture": (_other_architecture, finetune_argv,
        "vitplasticity finetune: error: checkpoint {ckpt} does not fit the architecture in its sidecar "
        "(vit_tiny_patch16_224 {'depth': 2, 'embed_dim': 64, 'img_size': 16, 'num_heads': 2, 'patch_size': 8}): "
        "30 tensor(s) of the wrong shape, e.g. blocks.0.attn.proj.bias is [32] in the file but [64] in the "
        "model; delete both files and fetch or pretrain it again"),
    "checkpoint without its sidecar": (_unlink(SIDECAR), finetune_argv,
        "vitplasticity finetune: error: checkpoint {ckpt} (or its .json sidecar) is missing; "
        "run its fetch/pretrain rule"),
    "sidecar that is not a checkpoint record": (
        _edit_json(SIDECAR, lambda r: {"sha256": r["sha256"]}), finetune_argv,
        "vitplasticity finetune: error: checkpoint sidecar {sidecar} is not a checkpoint record (lacks arch, "
        "img_size, mean, std); delete {ckpt} and its sidecar and fetch/pretrain it again"),
    "unwritable results folder": (lambda root: (root / "results").write_text("a file, not a folder"),
        finetune_argv,
        "vitplasticity finetune: error: cannot write --run-dir {root}/results/run: {root}/results is a file, "
        "not a folder; move or delete {root}/results, or choose another --run-dir path"),
    "settings that are not JSON": (_nothing,
        lambda root: ["finetune", "--settings", "{steps: 8}", "--checkpoint", str(root / CKPT),
                      "--task", str(root / TASK), "--run-dir", str(root / "results" / "run")],
        "vitplasticity finetune: error: --settings is not valid JSON (Expecting property name enclosed in double "
        "quotes: line 1 column 2 (char 1)); pass one JSON object, e.g. '{\"lr\": 0.01}'"),
    "zero steps in a job's settings": (_nothing, lambda root: finetune_argv(root, steps=0),
        "vitplasticity finetune: error: steps must be positive, got 0; set steps to at least 1"),
    "eval period beyond steps in a job's settings": (_nothing, lambda root: finetune_argv(root, eval_every=9),
        "vitplasticity finetune: error: eval_every must be in 1..steps (8), got 9; "
        "set eval_every between 1 and steps"),
    "unknown component in a job's settings": (_nothing, lambda root: finetune_argv(root, components=["attention"]),
        "vitplasticity finetune: error: arm: unknown component(s) ['attention']; "
        "allowed: emb, ln1, mha, ln2, fc1, fc2, head"),
    "ImageNet path not set": (_nothing, _imagenet_argv(None),
        "vitplasticity prepare: error: ImageNet val cannot be downloaded freely: get ILSVRC2012_img_val.tar and "
        "ILSVRC2012_devkit_t12.tar.gz from https://image-net.org (after accepting its terms) and set `path` and "
        "`devkit` of the imagenet_val task in the config to them, or `path` to a folder of class folders"),
    "ImageNet path missing": (_nothing, _imagenet_argv("ILSVRC2012_img_val.tar"),
        "vitplasticity prepare: error: ImageNet val path {root}/ILSVRC2012_img_val.tar does not exist; "
        "fix `path` of the imagenet_val task"),
    "a run to aggregate is missing": (_nothing, _aggregate_argv,
        "vitplasticity aggregate: error: {root}/results/runs/mha/metrics.json does not exist; check the path, "
        "or run the step that makes it"),
}
# Also run as a separate process, exactly as a workflow job runs.
FILE_CASES_AS_PROCESS = ["prepared array missing", "checkpoint corrupted", "unwritable results folder",
                         "ImageNet path not set"]


def fill(message: str, root: Path) -> str:
    for key, value in (("{task}", root / TASK), ("{ckpt}", root / CKPT), ("{sidecar}", root / SIDECAR),
                       ("{root}", root)):
        message = message.replace(key, str(value))
    return message


@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_bad_config_is_one_line_naming_the_key_and_the_fix(name):
    path, value, message = CONFIG_CASES[name]
    config = copy.deepcopy(SMOKE)
    _edit(config, path, value)
    with pytest.raises(UserError) as error:
        check_config(config, SCHEMA)
    assert str(error.value) == message


@pytest.mark.parametrize("name", CONFIG_CASES_THROUGH_SNAKEMAKE)
def test_bad_config_stops_the_workflow_before_any_job_and_writes_nothing(name, tmp_path):
    path, value, message = CONFIG_CASES[name]
    config = copy.deepcopy(SMOKE)
    _edit(config, path, value)
    bad = tmp_path / "bad.yaml"
    write_config(bad, config)
    workdir = tmp_path / "study"
    workdir.mkdir()
    result = snakemake(workdir, "--cores", "1", config=bad, check=False, timeout=300)
    assert result.returncode != 0
    assert result.stderr.splitlines() == [f"vitplasticity config error: {message}"]
    written = [p.relative_to(workdir).parts for p in workdir.rglob("*") if p.is_file()]
    assert all(parts[:2] == (".snakemake", "log") for parts in written), written  # only Snakemake's own log


@pytest.mark.parametrize("name", list(FILE_CASES))
def test_bad_file_is_one_line_naming_the_cause_and_the_fix_and_writes_nothing(name, case, capsys):
    damage, argv, message = FILE_CASES[name]
    damage(case)
    before = snapshot(case)
    assert run_cli(capsys, argv(case)) == (2, [fill(message, case)])
    assert snapshot(case) == before  # no output, no folder, no temporary, no code run from a file


@pytest.mark.parametrize("name", FILE_CASES_AS_PROCESS)
def test_bad_file_through_the_command_line_has_no_traceback(name, case):
    damage, argv, message = FILE_CASES[name]
    damage(case)
    before = snapshot(case)
    result = subprocess.run(cli_command(*argv(case)), capture_output=True, text=True, timeout=600, env=ENV)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [fill(message, case)]
    assert snapshot(case) == before


def test_a_booby_trapped_resume_state_is_refused_without_running_it(case, capsys):
    run_dir = case / "results" / "run"
    run_dir.mkdir(parents=True)
    torch.save({"step": 4, "params": {}, "optimizer": Trap(case / "PWNED"), "best": {}, "history": []},
               run_dir / "state.pt")
    code, lines = run_cli(capsys, finetune_argv(case))
    assert code == 2 and len(lines) == 1
    assert lines[0] == (f"vitplasticity finetune: error: resume state {run_dir / 'state.pt'} is unreadable "
                        "(UnpicklingError: not a file of tensors and plain data); delete it to restart the run")
    assert not (case / "PWNED").exists()


def test_results_folder_is_checked_before_any_work(case, capsys, monkeypatch):
    """An unwritable output fails at once: no dataset, checkpoint or model is even read."""
    (case / "results").write_text("")
    called = []
    monkeypatch.setattr(jobs, "finetune", lambda *args: called.append(args))
    code, lines = run_cli(capsys, finetune_argv(case))
    assert code == 2 and called == [] and len(lines) == 1 and "is a file, not a folder" in lines[0]
