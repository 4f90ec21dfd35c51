"""The kit job-level tests start from, and helpers to run, watch and kill jobs and workflows.

The kit is one prepared synthetic task and one randomly initialised checkpoint at the paths the
workflow would hand a job (`TASK`, `CKPT`, `SIDECAR`); the fixtures `kit` (built once) and `case`
(a private copy to damage) are in conftest.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
import yaml
from conftest import ROOT, SMOKE_CONFIG

from vitplasticity import cli, models
from vitplasticity.datasets.sources import prepare_task
from vitplasticity.machine import Runtime

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


def build_kit(root: Path) -> Path:
    """Write the kit under `root` (no workflow needed); returns `root`."""
    data = {"source": "synthetic", "kind": "novel", "image_size": 16, "n_train": 128, "n_val": 64, "n_test": 64,
            "seed": 0}
    prepare_task("novel", data, root / TASK, root / "data" / "raw")
    torch.manual_seed(0)
    record = {"arch": ARCH, "img_size": 16, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
              "provenance": {"kind": "test"}}
    models.save_checkpoint(root / CKPT, models.build(ARCH, num_classes=5), record)
    return root


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

