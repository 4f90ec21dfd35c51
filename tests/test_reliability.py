"""Reliability: interruption, bad input, divergence, safe loading and concurrency.

- interruption: `kill -9` at every stage, then a rerun, completes the study with exactly the
  results of an uninterrupted one; nothing half-written is ever taken as complete;
- bad input: a catalogue of malformed configs and files, each stopped with one line that
  names the cause and the fix, with no traceback and nothing written;
- divergence: a NaN loss ends that run as `diverged` (metrics.json, MLflow, tables, figures)
  and the study goes on;
- safe loading: no unrestricted unpickling, no credentials in configs, logs or MLflow,
  servers in docs and tests on 127.0.0.1;
- concurrency: jobs never share an output, log or run folder; a second Snakemake on the same
  folder is refused by its lock and changes nothing.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import json
import os
import pickle
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import torch
import yaml
from conftest import ROOT, SMOKE_CONFIG, snakemake, write_config

from vitplasticity import cli, figures, jobs, models, tracking, training
from vitplasticity.components import set_trainable
from vitplasticity.config import check_config
from vitplasticity.datasets.synthetic import generate
from vitplasticity.errors import UserError
from vitplasticity.fileio import sha256_file, write_json
from vitplasticity.machine import Runtime, Tracking
from vitplasticity.prepared import Split, write_prepared
from vitplasticity.registry import FIGURES

pytestmark = pytest.mark.reliability

SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
SMOKE = yaml.safe_load(SMOKE_CONFIG.read_text())
ENV = dict(os.environ, MPLBACKEND="Agg", DVC_NO_ANALYTICS="1")
KILL_TIMEOUT_S = 900  # a loaded 2-core machine runs the smoke study in minutes

# The kit: one prepared task and one checkpoint, as the workflow would hand them to a job.
TASK = "data/prepared/novel"
CKPT = "data/checkpoints/vit.safetensors"
SIDECAR = "data/checkpoints/vit.json"
ARCH = {"timm_name": "vit_tiny_patch16_224",
        "kwargs": {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}}
FINETUNE = {"model": "vit", "task": "novel", "optimizer": "sgd", "arm": "mha", "components": ["mha"], "lr": 0.01,
            "seed": 0, "steps": 8, "eval_every": 4, "batch_size": 32, "warmup_steps": 2, "momentum": 0.9,
            "weight_decay": 0.0, "betas": [0.9, 0.999], "clip_norm": 1.0, "crop_scale": [0.08, 1.0]}
RUNTIME = Runtime(eval_batch=64)


# ---------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Path:
    """A prepared synthetic task and a randomly initialised checkpoint (no workflow needed)."""
    root = tmp_path_factory.mktemp("kit")
    data = {"source": "synthetic", "kind": "novel", "image_size": 16, "n_train": 128, "n_val": 64, "n_test": 64,
            "seed": 0}
    jobs.prepare("novel", data, root / TASK, root / "data" / "raw")
    torch.manual_seed(0)
    record = {"arch": ARCH, "img_size": 16, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
              "provenance": {"kind": "test"}}
    models.save_checkpoint(root / CKPT, models.build(ARCH, num_classes=5), record)
    return root


@pytest.fixture
def case(kit, tmp_path) -> Path:
    """A private copy of the kit to damage."""
    shutil.copytree(kit, tmp_path / "case")
    return tmp_path / "case"


@pytest.fixture
def settled_copy(smoke_copy) -> Path:
    """The smoke copy after a plain rerun, so a test sees only the effect of its own change.

    """
    snakemake(smoke_copy, "--cores", "2")
    return smoke_copy


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` (hidden ones too) with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def temporaries(root: Path) -> list[Path]:
    """Files or folders left by interrupted atomic writes, and resume states."""
    return sorted(p for p in root.rglob("*") if p.name.endswith(".tmp") or p.name == "state.pt")


def run_cli(capsys, argv: list[str]) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = cli.main(argv)
    return code, capsys.readouterr().err.splitlines()


def cli_command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "vitplasticity", *argv]


def finetune_argv(root: Path, run_dir: Path | None = None, threads: int | None = None, **changes) -> list[str]:
    argv = ["finetune", "--settings", json.dumps({**FINETUNE, **changes}),
            "--checkpoint", str(root / CKPT), "--task", str(root / TASK),
            "--run-dir", str(run_dir or root / "results" / "run")]
    return argv + (["--threads", str(threads)] if threads else [])


def comparable(metrics_file: Path) -> dict:
    """A run's metrics without what depends on the machine and the clock."""
    metrics = json.loads(metrics_file.read_text())
    return {k: v for k, v in metrics.items() if k not in ("wall_time_s", "host")}


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def runs_command(argv: list[str], command: str) -> bool:
    """Whether a process is `python -m vitplasticity <command>` or the `vitplasticity <command>` script."""
    for i, arg in enumerate(argv[1:-1], 1):
        if arg == "vitplasticity" and argv[i - 1] == "-m" or Path(arg).name == "vitplasticity":
            return argv[i + 1] == command
    return False


def vitplasticity_jobs(root: psutil.Process, command: str) -> list[tuple[psutil.Process, list[str]]]:
    """The `vitplasticity <command>` processes among `root` and its descendants."""
    found = []
    with contextlib.suppress(psutil.NoSuchProcess):
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                argv = proc.cmdline()
                if runs_command(argv, command):
                    found.append((proc, argv))
    return found


def kill_job_when(parent: subprocess.Popen, command: str, ready: Callable[[list[str]], bool],
                  whole_tree: bool = False) -> list[str]:
    """SIGKILL the first running `vitplasticity <command>` under `parent` once `ready(its argv)`.

    The candidate is frozen (SIGSTOP) while `ready` looks at its files, and runs a few
    milliseconds between looks, so a short window is not missed. `whole_tree` kills `parent`
    and everything under it instead (a crash of the machine, not of one job). Returns the argv.
    """
    root = psutil.Process(parent.pid)
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while time.monotonic() < deadline:
        if parent.poll() is not None:
            raise AssertionError(f"{command}: the process ended (exit {parent.returncode}) before the kill point")
        for proc, argv in vitplasticity_jobs(root, command):
            try:
                proc.suspend()
                if ready(argv):
                    victims = [root, *root.children(recursive=True)] if whole_tree else [proc]
                    for victim in victims:
                        with contextlib.suppress(psutil.NoSuchProcess):
                            victim.kill()
                    if proc.pid != parent.pid:  # the caller reaps its own child, and gets its exit status
                        proc.wait(60)
                    return argv
                proc.resume()
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.003)
    raise AssertionError(f"no {command} job reached the kill point in {KILL_TIMEOUT_S} s")


def start_workflow(workdir: Path, log: Path, *args: str, config: Path = SMOKE_CONFIG) -> subprocess.Popen:
    command = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(workdir),
               "--configfile", str(config), *args]
    with open(log, "w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=ENV)


# ---------------------------------------------------------------------------------------------
# Bad input: the catalogue. Each entry: what is broken, and the one line that must be printed.


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
    return ["aggregate", "--settings", json.dumps({"experiment": "main", "arms": {"mha": ["mha"]}}),
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
        "vitplasticity prepare: error: ImageNet val cannot be downloaded freely: get ILSVRC2012_img_val.tar from "
        "https://image-net.org (after accepting its terms) and set `path` of the imagenet_val task in the config "
        "to that tar or to a folder of its images"),
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


# ---------------------------------------------------------------------------------------------
# Interruption


def test_a_writer_killed_mid_write_leaves_nothing_taken_as_complete(tmp_path):
    target, folder = tmp_path / "metrics.json", tmp_path / "prepared"
    target.write_text("the previous, complete version\n")
    other = tmp_path / ".metrics.json.bak.abcdefgh.tmp"  # a temporary of another file ("metrics.json.bak")
    other.write_text("")
    code = """if True:
        import os, signal, sys
        import numpy as np
        from vitplasticity.fileio import atomic_dir, atomic_path
        with atomic_path(sys.argv[1]) as tmp:
            tmp.write_text('{"half": ')
            with atomic_dir(sys.argv[2]) as partial:
                np.save(partial / "train_images.npy", np.zeros((4, 8, 8, 3), np.uint8))
                os.kill(os.getpid(), signal.SIGKILL)
    """
    done = subprocess.run([sys.executable, "-c", code, str(target), str(folder)], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert target.read_text() == "the previous, complete version\n"
    assert not folder.exists()
    assert len(list(tmp_path.glob(".metrics.json.*.tmp"))) == 2 and len(list(tmp_path.glob(".prepared.*.tmp"))) == 1

    # The next write of each path clears what the killed writer left, and nothing else.
    write_json(target, {"complete": True})
    images, labels = np.zeros((2, 8, 8, 3), np.uint8), np.zeros(2, np.int64)
    write_prepared(folder, {"train": (images, labels)}, ["a"], {"test": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, folder.name, other.name])
    assert json.loads(target.read_text()) == {"complete": True}
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # readable by others, as any file the user writes
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask


def _steps_of(state_ready: Callable[[Path], bool]) -> Callable[[list[str]], bool]:
    return lambda argv: state_ready(Path(option(argv, "--run-dir")))


def test_finetune_killed_twice_resumes_to_exactly_the_uninterrupted_metrics(kit, tmp_path):
    """CPU, same seed: kill -9 after the first saved state, again after a later one, then finish."""
    settings = {"steps": 40, "eval_every": 10}
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    done = subprocess.run(cli_command(*finetune_argv(kit, reference, threads=1, **settings)), capture_output=True,
                          text=True, timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr

    first = subprocess.Popen(cli_command(*finetune_argv(kit, run_dir, threads=1, **settings)),
                             stderr=subprocess.DEVNULL, env=ENV)
    kill_job_when(first, "finetune", _steps_of(lambda d: (d / "state.pt").exists()))
    assert first.wait(60) == -signal.SIGKILL
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "history.csv").exists()
    saved = (run_dir / "state.pt").stat().st_ino

    second = subprocess.Popen(cli_command(*finetune_argv(kit, run_dir, threads=1, **settings)),
                              stderr=subprocess.DEVNULL, env=ENV)
    kill_job_when(second, "finetune", _steps_of(
        lambda d: (d / "state.pt").exists() and (d / "state.pt").stat().st_ino != saved))
    assert second.wait(60) == -signal.SIGKILL
    assert not (run_dir / "metrics.json").exists()

    done = subprocess.run(cli_command(*finetune_argv(kit, run_dir, threads=1, **settings)), capture_output=True,
                          text=True, timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr
    resumed_at = int(re.search(r"resuming from step (\d+)", done.stderr).group(1))
    assert 20 <= resumed_at < 40
    assert comparable(run_dir / "metrics.json") == comparable(reference / "metrics.json")
    assert (run_dir / "history.csv").read_bytes() == (reference / "history.csv").read_bytes()
    assert temporaries(run_dir) == []


def _tiny_splits() -> dict[str, Split]:
    out = {}
    for split, count in (("train", 48), ("val", 16), ("test", 16)):
        images, labels, _ = generate("shapes", "source", split, count, 16, seed=0)
        out[split] = Split(images, labels)
    return out


def _tiny_model(components: list[str]) -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.build(ARCH, num_classes=5)
    set_trainable(model, components)
    return model


class Interrupted(Exception):
    pass


def _interrupt(rows):
    raise Interrupted


def test_a_state_saved_under_other_settings_is_not_resumed(tmp_path):
    """An interrupted run whose steps or arm then changed starts over instead of mixing the two."""
    splits, cpu, state = _tiny_splits(), torch.device("cpu"), tmp_path / "state.pt"
    old = training.TrainConfig(steps=6, eval_every=2, batch_size=16, lr=0.05, seed=0, img_size=16, eval_batch=16)
    new = dataclasses.replace(old, steps=8)
    uninterrupted = training.train(_tiny_model(["mha"]), splits, new, cpu, progress=lambda _: None)
    for components, cfg in ((["mha"], old), (["fc1"], new)):  # other steps; another arm, same steps
        with pytest.raises(Interrupted):
            training.train(_tiny_model(components), splits, cfg, cpu, state_path=state, on_eval=_interrupt,
                           progress=lambda _: None)
        assert state.exists()
        said = []
        result = training.train(_tiny_model(["mha"]), splits, new, cpu, state_path=state, progress=said.append)
        assert any("starting over" in line for line in said), said
        assert result == uninterrupted
        state.unlink()


def _temporary_sibling(workdir: Path) -> Callable[[list[str]], bool]:
    """Whether a prepare job is writing its folder under a temporary name."""
    def ready(argv):
        out = workdir / option(argv, "--out")
        return out.parent.is_dir() and any(p.name.startswith(f".{out.name}.") and p.name.endswith(".tmp")
                                           for p in out.parent.iterdir())
    return ready


@pytest.mark.slow
def test_kill_at_every_stage_then_rerun_completes_the_study_exactly(smoke_run, tmp_path):
    """kill -9 during prepare, pretrain, a finetune and (the whole machine) aggregation; rerun each time.

    The study is the smoke study cut to one task and two arms; its runs are the smoke study's,
    with the same settings, so they must end with the smoke run's exact results.
    """
    config = copy.deepcopy(SMOKE)
    config["experiments"]["main"].update(tasks=["novel"], arms=["all", "mha"])
    small = tmp_path / "small.yaml"
    write_config(small, config)
    workdir = tmp_path / "study"  # the jobs' paths are relative to it
    workdir.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(log, *args):
        return start_workflow(workdir, logs / log, "--cores", "2", *args, config=small)

    # 1. A prepare job, while its folder is being written under a temporary name.
    flow = start("1.log")
    killed = workdir / option(kill_job_when(flow, "prepare", _temporary_sibling(workdir)), "--out")
    assert flow.wait(KILL_TIMEOUT_S) != 0
    assert not killed.exists() and list(killed.parent.glob(f".{killed.name}.*.tmp"))
    assert all((p / "meta.json").exists() for p in killed.parent.iterdir() if not p.name.startswith("."))

    # 2. Pretraining, after it saved its state.
    flow = start("2.log", "--rerun-incomplete")
    pretrain = workdir / option(kill_job_when(flow, "pretrain", _steps_of(lambda d: (workdir / d / "state.pt")
                                                                           .exists())), "--run-dir")
    assert flow.wait(KILL_TIMEOUT_S) != 0
    assert (pretrain / "state.pt").exists() and not (workdir / "data/checkpoints/vit_smoke.safetensors").exists()

    # 3. A finetune run, after it saved its state and before its metrics.
    flow = start("3.log", "--rerun-incomplete")
    finetune = workdir / option(kill_job_when(flow, "finetune", _steps_of(
        lambda d: (workdir / d / "state.pt").exists() and not (workdir / d / "metrics.json").exists())), "--run-dir")
    assert flow.wait(KILL_TIMEOUT_S) != 0
    assert (finetune / "state.pt").exists() and not (finetune / "metrics.json").exists()

    # 4. Snakemake and its job at once (a power cut) while aggregation writes its tables.
    def half_written(argv):
        out = workdir / option(argv, "--out-dir")
        return (out / "main_table.csv").exists() and not (out / "main_table.md").exists()

    flow = start("4.log", "--rerun-incomplete")
    kill_job_when(flow, "aggregate", half_written, whole_tree=True)
    flow.wait(60)
    refused = snakemake(workdir, "--cores", "2", "--rerun-incomplete", config=small, check=False)
    assert refused.returncode != 0 and "--unlock" in refused.stdout + refused.stderr  # the crash left the lock

    snakemake(workdir, "--unlock", config=small)
    snakemake(workdir, "--cores", "2", "--rerun-incomplete", config=small)
    assert "Nothing to be done" in snakemake(workdir, "-n", config=small).stdout

    # Exactly the uninterrupted study: data, checkpoint, every run, the tables; no leftovers.
    for task in ("source", "novel"):
        meta = f"data/prepared/{task}/meta.json"
        assert (workdir / meta).read_text() == (smoke_run / meta).read_text()
    checkpoint = "data/checkpoints/vit_smoke.safetensors"
    assert (workdir / checkpoint).read_bytes() == (smoke_run / checkpoint).read_bytes()
    reruns = sorted(workdir.glob("results/runs/**/metrics.json"))
    assert len(reruns) == 4
    for metrics in reruns:
        reference = smoke_run / metrics.relative_to(workdir)
        assert comparable(metrics) == comparable(reference), metrics
        assert metrics.with_name("history.csv").read_bytes() == reference.with_name("history.csv").read_bytes()
    for table, keys in (("main_table", ["task", "arm"]), ("plasticity", ["task"]), ("bounds", ["task"])):
        ours = pd.read_csv(workdir / f"results/tables/main/{table}.csv")
        theirs = pd.read_csv(smoke_run / f"results/tables/main/{table}.csv").merge(ours[keys].drop_duplicates())
        pd.testing.assert_frame_equal(ours, theirs, check_exact=True)
    assert temporaries(workdir / "data") == [] and temporaries(workdir / "results") == []
    log = workdir / "results/logs/finetune" / finetune.relative_to(workdir / "results/runs")
    assert "resuming from step 4" in log.with_name(log.name + ".log").read_text()
    assert "resuming from step 15" in (workdir / "results/logs/pretrain_checkpoint/vit_smoke.log").read_text()


# ---------------------------------------------------------------------------------------------
# Divergence


def test_divergence_is_recorded_in_metrics_json_and_mlflow(kit, tmp_path, monkeypatch, capsys):
    secret = "hf_" + "Zq8x" * 6
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    track = Tracking(enabled=True, uri=uri, experiment="reliability")
    tracking.prepare_study(track, ["vit/novel/sgd"], tmp_path / "results")  # as the workflow's onstart does
    run_dir = tmp_path / "run"

    metrics = jobs.finetune({**FINETUNE, "lr": 1e30}, RUNTIME, kit / TASK, kit / CKPT, run_dir, track)

    expected = {"status": "diverged", "diverged_step": 2, "steps_done": 2, "test_acc": None, "test_loss": None,
                "best_val_acc": None, "best_step": None}  # it diverged before its first evaluation
    assert {k: metrics[k] for k in expected} == expected
    assert {k: v for k, v in json.loads((run_dir / "metrics.json").read_text()).items() if k in expected} == expected
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history["step"]) == [1, 2] and np.isnan(history["loss"].iloc[-1])
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "history.csv", "metrics.json",
                                                         "mlflow_run.json"]  # no state.pt left

    from mlflow.tracking import MlflowClient

    run = MlflowClient(uri).get_run(json.loads((run_dir / "mlflow_run.json").read_text())["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["status"] == "diverged" and run.data.metrics["diverged_step"] == 2
    assert "test_acc" not in run.data.metrics

    # No credential from the environment reaches the run folder, the log or MLflow.
    seen = [capsys.readouterr().err, *(p.read_text() for p in run_dir.iterdir()),
            json.dumps(run.data.params), json.dumps(run.data.tags)]
    assert not any(secret in text for text in seen)


@pytest.mark.slow
def test_a_diverging_learning_rate_is_shown_as_such_and_the_study_goes_on(settled_copy, tmp_path, monkeypatch):
    config = copy.deepcopy(SMOKE)
    config["tasks"]["novel"]["lrs"] = [0.01, 0.03, 1e30]
    diverging = tmp_path / "diverging.yaml"
    write_config(diverging, config)
    kept = settled_copy / "results/runs/vit_smoke/novel/sgd/mha/lr0.01_seed0/metrics.json"
    kept_mtime = kept.stat().st_mtime_ns
    figure = settled_copy / "results/figures/main/lr_robustness.png"
    figure_mtime = figure.stat().st_mtime_ns

    snakemake(settled_copy, "--cores", "2", config=diverging)  # exit 0: the study goes on

    arms = sorted(SMOKE["arms"])
    for arm in arms:
        run = settled_copy / f"results/runs/vit_smoke/novel/sgd/{arm}/lr1e+30_seed0"
        metrics = json.loads((run / "metrics.json").read_text())
        assert (metrics["status"], metrics["diverged_step"], metrics["test_acc"]) == ("diverged", 2, None), arm
        assert not (run / "state.pt").exists()
    assert kept.stat().st_mtime_ns == kept_mtime  # the other runs were not redone

    tables = settled_copy / "results/tables/main"
    runs = pd.read_csv(tables / "runs.csv")
    diverged = runs[runs["lr"] == 1e30]
    assert sorted(diverged["arm"]) == arms and set(diverged["status"]) == {"diverged"}
    assert set(diverged["diverged_step"]) == {2} and diverged["test_acc"].isna().all()
    assert set(runs[runs["lr"] != 1e30]["status"]) == {"completed"}
    main = pd.read_csv(tables / "main_table.csv")
    assert dict(zip(main["task"] + "/" + main["arm"], main["diverged_runs"], strict=True)) == {
        f"{task}/{arm}": int(task == "novel") for task in ("novel", "sketch") for arm in arms}
    assert main["best_lr"].isin([0.01, 0.03]).all()  # a diverged lr is never the best one
    novel_row = next(line for line in (tables / "main_table.md").read_text().splitlines()
                     if line.startswith("| novel |"))
    assert novel_row.count("(1 diverged)") == len(arms)
    assert figure.stat().st_mtime_ns > figure_mtime

    # The figures name the diverged runs, and draw an arm whose every run diverged without failing.
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda fig, out_dir, name: drawn.append((name, fig)))
    figures.lr_robustness(runs, tmp_path)
    axes = {ax.get_title(): ax for ax in drawn[-1][1].axes}
    assert "novel (5 diverged runs not drawn)" in axes and "sketch" in axes
    assert "MHA\n(1 diverged)" in [t.get_text() for t in axes["novel (5 diverged runs not drawn)"].get_xticklabels()]

    monkeypatch.undo()
    monkeypatch.chdir(settled_copy)  # runs.csv names run folders relative to the study
    broken = tmp_path / "tables"
    shutil.copytree(tables, broken)
    all_ln1 = runs["arm"] == "ln1"
    runs.loc[all_ln1, ["status", "test_acc"]] = ["diverged", np.nan]
    runs.to_csv(broken / "runs.csv", index=False)
    main.loc[main["arm"] == "ln1", ["best_lr", "mean", "std", "diverged_runs"]] = [np.nan, np.nan, np.nan, 3]
    main.to_csv(broken / "main_table.csv", index=False)
    figures.make_figures(broken, tmp_path / "figures")
    for name in ("accuracy_per_arm", "lr_robustness", "training_curves", "relative_gain"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------------------
# Safe loading and credentials


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func), {k.arg: k.value for k in node.keywords}


def test_no_file_is_unpickled_without_restriction():
    """Checkpoints are safetensors; resume states go through torch.load(weights_only=True); no pickle."""
    offences = []
    for path in sorted((ROOT / "src" / "vitplasticity").rglob("*.py")):
        for call, name, keywords in _calls(ast.parse(path.read_text())):
            where = f"{path.relative_to(ROOT)}:{call.lineno} {name}"
            weights_only = keywords.get("weights_only")
            if name == "torch.load" and not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                offences.append(f"{where} without weights_only=True")
            if re.fullmatch(r"(c?pickle|dill|joblib|cloudpickle|marshal)\.loads?|pickle\.Unpickler", name):
                offences.append(where)
            allow = keywords.get("allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                offences.append(f"{where} with allow_pickle")
    assert offences == []
    source = (ROOT / "src" / "vitplasticity" / "models.py").read_text()
    assert "from safetensors.torch import load_file" in source


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


CREDENTIAL_KEY = re.compile(r"(password|passwd|secret|token|api_?key|access_?key)\s*:\s*['\"]?[^\s'\"#]+", re.I)
URL_USERINFO = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@", re.I)


def test_shipped_configs_hold_no_credentials():
    files = [*ROOT.glob("config/*.yaml"), *ROOT.glob("tests/data/*.yaml"), *ROOT.glob("workflow/profiles/*/*.yaml"),
             *ROOT.glob("dvc.yaml"), *ROOT.glob(".dvc/config")]
    assert files
    offences = [f"{path.relative_to(ROOT)}: {match.group(0)}" for path in files
                for pattern in (CREDENTIAL_KEY, URL_USERINFO) for match in pattern.finditer(path.read_text())]
    assert offences == []


def test_a_credential_in_a_download_url_is_never_printed(tmp_path, capsys):
    data = {"source": "cifar10", "store_size": 32, "split_seed": 0, "val_fraction": 0.2,
            "url": "http://reader:s3cr3t-Passw0rd@127.0.0.1:9/cifar-10-python.tar.gz",
            "checksum": "md5:c58f30108f718f92721af3b95e74349a"}
    code, lines = run_cli(capsys, ["prepare", "--settings", json.dumps({"name": "cifar10", "data": data}),
                                   "--out", str(tmp_path / "prepared"), "--raw", str(tmp_path / "raw")])
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("vitplasticity prepare: error: cannot download http://127.0.0.1:9/cifar-10-python")
    assert "s3cr3t" not in lines[0] and "reader" not in lines[0]
    assert not (tmp_path / "prepared").exists()


# `--host X`, `--bind-address=X`, `"--host", "X"`; and ("X", port) given to a socket or server.
HOST_OPTION = re.compile(r"--(?:bind-address|host|bind)(?:=|['\"]?,?\s+['\"]?)([^\s'\",)]+)")
SERVER_CALL = re.compile(r"\bbind\(|Server\(|create_server\(|__init__\(\(")
SOCKET_ADDRESS = re.compile(r"\(\s*['\"]([^'\"]*)['\"]\s*,\s*(?:\d+|port)\s*\)")


def test_servers_in_docs_and_tests_listen_on_127_0_0_1_only():
    files = [ROOT / "README.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("scripts/**/*.sh"),
             *ROOT.glob("tests/**/*.py"), *ROOT.glob("tests/**/*.sh"), *ROOT.glob(".ci/**/*.sh")]
    offences = []
    for path in files:
        if path.resolve() == Path(__file__).resolve() or not path.exists():
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            hosts = HOST_OPTION.findall(line) + (SOCKET_ADDRESS.findall(line) if SERVER_CALL.search(line) else [])
            if "0.0.0.0" in line or any(host != "127.0.0.1" for host in hosts):
                offences.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offences == []


# ---------------------------------------------------------------------------------------------
# Concurrency


def _dry_run_jobs(output: str) -> list[dict[str, list[str]]]:
    """Each planned job's rule and the files it writes (outputs, log, benchmark), from `snakemake -n`."""
    jobs_, job = [], None
    for line in output.splitlines():
        if line.startswith(("rule ", "localrule ")) and line.endswith(":"):
            job = {"rule": [line.split()[1].rstrip(":")], "writes": []}
            jobs_.append(job)
        elif job is not None and re.match(r"    (output|log|benchmark): ", line):
            job["writes"] += line.split(": ", 1)[1].split(", ")
    return jobs_


# Rules that keep more files (state.pt, mlflow_run.json) in the folder of this output.
RUN_FOLDER_RECORD = {"finetune": "metrics.json", "pretrain_checkpoint": "metrics.json", "linear_probe": "metrics.json",
                     "measure_plasticity": "plasticity.csv"}


def test_no_two_jobs_of_the_paper_study_write_the_same_file_or_run_folder(tmp_path):
    result = snakemake(tmp_path, "-n", config=ROOT / "config" / "config.yaml", timeout=600)
    planned = _dry_run_jobs(result.stdout)
    assert len([j for j in planned if j["rule"] == ["finetune"]]) == 1836 + 660  # arms + the main experiment's controls
    written = [path for job in planned for path in job["writes"]]
    assert len(written) == len(set(written)), "two jobs write the same file"
    # Jobs that keep more files beside their outputs (state.pt, mlflow_run.json) own that folder alone.
    owners: dict[str, set[int]] = {}
    for index, job in enumerate(planned):
        for path in job["writes"]:
            if not path.startswith("results/logs/") and not path.startswith("results/benchmarks/"):
                owners.setdefault(str(Path(path).parent), set()).add(index)
    for index, job in enumerate(planned):
        record = RUN_FOLDER_RECORD.get(job["rule"][0])
        if record:
            folder = str(Path(next(p for p in job["writes"] if Path(p).name == record)).parent)
            assert owners[folder] == {index}, (job["rule"], folder)


@pytest.mark.slow
def test_a_second_workflow_on_the_same_folder_is_refused_and_changes_nothing(settled_copy, tmp_path):
    first = start_workflow(settled_copy, tmp_path / "first.log", "--cores", "1", "--forcerun", "figures")
    root = psutil.Process(first.pid)
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while not (running := vitplasticity_jobs(root, "figures")):
        assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
        time.sleep(0.05)
    job = running[0][0]
    job.suspend()  # hold the first workflow in the middle of its job
    try:
        tables = snapshot(settled_copy / "results" / "tables")
        second = snakemake(settled_copy, "--cores", "1", "--forcerun", "figures", check=False)
        assert second.returncode != 0
        assert "Directory cannot be locked" in second.stdout + second.stderr
        assert len(vitplasticity_jobs(root, "figures")) == 1  # the second started no job of its own
        assert snapshot(settled_copy / "results" / "tables") == tables
        assert any((settled_copy / ".snakemake" / "locks").iterdir())  # the first one's lock is still there
    finally:
        job.resume()
    assert first.wait(KILL_TIMEOUT_S) == 0, (tmp_path / "first.log").read_text()
    assert "Nothing to be done" in snakemake(settled_copy, "-n").stdout
    for name in FIGURES:
        for suffix in ("png", "pdf"):
            assert (settled_copy / "results" / "figures" / "main" / f"{name}.{suffix}").stat().st_size > 1000


def test_results_folder_is_checked_before_any_work(case, capsys, monkeypatch):
    """An unwritable output fails at once: no dataset, checkpoint or model is even read."""
    (case / "results").write_text("")
    called = []
    monkeypatch.setattr(jobs, "finetune", lambda *args: called.append(args))
    code, lines = run_cli(capsys, finetune_argv(case))
    assert code == 2 and called == [] and len(lines) == 1 and "is a file, not a folder" in lines[0]
