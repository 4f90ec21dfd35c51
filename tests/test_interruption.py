"""Interruption: `kill -9` at every stage, then a rerun, completes the study with exactly the results
of an uninterrupted one; nothing half-written is ever taken as complete; a resume state saved under
other settings is not resumed."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import snakemake, write_config
from jobkit import (
    ARCH,
    ENV,
    KILL_TIMEOUT_S,
    SMOKE,
    cli_command,
    comparable,
    finetune_argv,
    kill_job_when,
    option,
    start_workflow,
    temporaries,
)

from vitplasticity import models, training
from vitplasticity.components import set_trainable
from vitplasticity.datasets.synthetic import generate
from vitplasticity.fileio import write_json
from vitplasticity.prepared import Split, write_prepared

pytestmark = pytest.mark.reliability


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
    kept = "results/pretrain/vit_smoke/checkpoints"  # the weights of every evaluation, kept across the kill
    assert sorted(p.name for p in (workdir / kept).iterdir()) == sorted(p.name for p in (smoke_run / kept).iterdir())
    for reference in (smoke_run / kept).iterdir():
        assert (workdir / kept / reference.name).read_bytes() == reference.read_bytes(), reference.name
    assert not (workdir / "results/pretrain/vit_smoke/checkpoints.partial").exists()
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
