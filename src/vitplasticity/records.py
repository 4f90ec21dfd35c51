"""The job record: one JSON file per job, the truth that MLflow mirrors.

Every job that leaves a run folder ends by writing `record.json` there through `write`, last and
atomically: its kind, MLflow run name and parent, params, final metrics and the values that run
along something (per layer, per pretraining step) under the names MLflow shows, its artifacts and
history file, tags (git commit and dirty flag, host, user, device, SLURM job id) and `resources` (the
job's wall time and its own peak memory). `tracking` mirrors records into MLflow and never reads anything
else of a run folder. Kept free of heavy imports: every job writes one.
"""

from __future__ import annotations

import contextlib
import getpass
import math
import numbers
import os
import resource
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

from vitplasticity.fileio import is_missing, read_json, write_json
from vitplasticity.registry import lr_label

FILE = "record.json"
# Accuracies are fractions in the run folders' own files and percentages in the tables and in MLflow.
PERCENT_KEYS = frozenset({"val_acc", "best_val_acc", "test_acc", "source_test_acc", "train_acc"})
# Folders under results/ that hold no record (searched by every `snakemake` start: keep it short).
_UNSEARCHED = frozenset({"mlartifacts", "logs", "benchmarks", "checkpoints", "checkpoints.partial"})
# The columns of a history file (`training.HISTORY_COLUMNS`) that MLflow draws against the step.
HISTORY_KEYS = ("loss", "lr", "grad_norm", "val_loss", "val_acc")


def shown(key: str, value: float) -> float:
    """A value as the record and MLflow show it: accuracies (fractions in the run folders) in %."""
    return 100.0 * float(value) if key in PERCENT_KEYS else float(value)


def run_name(kind: str, settings: dict) -> str:
    """The MLflow run name of a job, e.g. `mha/cifar10/lr0.01/seed42` for a finetuning run (the arm
    first: the UI cuts long names, and runs are compared by arm)."""
    if kind == "finetune":
        return f"{settings['arm']}/{settings['task']}/lr{lr_label(settings['lr'])}/seed{settings['seed']}"
    if kind in ("pretrain", "trajectory"):  # jobs of a model, not of a task
        return f"{kind}/{settings['model']}"
    if kind in ("aggregate", "figures"):  # jobs of an experiment
        return f"{kind}/{settings['experiment']}"
    return f"{kind}/{settings['model']}/{settings['task']}"


def parent_name(settings: dict) -> str:
    """The parent run grouping a finetuning run: `model/task/optimizer`."""
    return f"{settings['model']}/{settings['task']}/{settings['optimizer']}"


def write(folder: Path, kind: str, params: dict, *, started: float, metrics: dict | None = None,
          series: dict[str, list[tuple[int, float]]] | None = None, artifacts: Sequence[Path] = (),
          history: Path | None = None, device: str | None = None) -> dict:
    """Write the record of a job that ran from `started` (`time.time()`) until now; return it.

    `metrics`: final values, accuracies as fractions (shown in %); a text value becomes a tag, a
    missing one (None, NaN) is left out. `series`: {name: [(step, value)]}, e.g. `series(...)`.
    `artifacts`: files and folders of the run (normally inside `folder`); `history`: its history CSV
    (columns `training.HISTORY_COLUMNS`). Every path is stored relative to `folder`, so a copied study
    keeps its records. Finetuning runs name their parent run (`parent_name`).
    """
    folder = Path(folder)
    ended = time.time()
    values, texts = {}, {}
    for key, value in (metrics or {}).items():
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            if math.isfinite(value):
                values[key] = shown(key, value)
        elif not is_missing(value):
            texts[key] = str(value)
    record = {
        "id": uuid.uuid4().hex, "kind": kind, "run_name": run_name(kind, params),
        "parent": parent_name(params) if kind == "finetune" else None, "params": params,
        "metrics": values, "series": {key: [[int(step), shown(key, value)] for step, value in sorted(points)]
                                      for key, points in (series or {}).items()},
        "artifacts": [os.path.relpath(path, folder) for path in artifacts],
        "history": os.path.relpath(history, folder) if history else None,
        "tags": environment_tags() | texts | {"kind": kind, **({"device": device} if device else {})},
        "start_ms": int(started * 1000), "end_ms": int(ended * 1000),
        "resources": {"wall_s": ended - started, "peak_rss_mib": peak_rss_mib(), **_peak_gpu()},
    }
    write_json(folder / FILE, record)
    return record


def read(folder: Path) -> dict | None:
    """The record of a run folder; None when it has none (its job has not finished) or it cannot be read."""
    try:
        record = read_json(Path(folder) / FILE)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "id" in record else None


def find(results_dir: Path, *holding: str) -> list[Path]:
    """Every run folder under `results_dir` that holds a record (or, given `holding`, one of those
    files), in path order. Folders whose name starts with a dot (a writer's temporary folder) and
    those no job keeps a record in (the MLflow artifacts, logs, Snakemake's benchmarks, kept
    checkpoints) are not searched."""
    found = []
    for root, folders, files in os.walk(results_dir):
        folders[:] = [name for name in folders if not name.startswith(".") and name not in _UNSEARCHED]
        if set(holding or (FILE,)) & set(files):
            found.append(Path(root))
    return sorted(found)


def series(rows: Iterable[dict], along: str, by: Sequence[str], value: str) -> dict[str, list[tuple[int, float]]]:
    """{"/"-joined `by` columns: [(step = column `along`, mean of `value` over the rows at that step)]};
    a missing value (NaN, None) is left out. E.g. a plasticity table's rows with along="layer",
    by=("mode", "component"), value="mean": MLflow then draws plasticity against depth."""
    values: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        if is_missing(row[value]):
            continue
        key = "/".join(str(row[column]) for column in by)
        values.setdefault(key, {}).setdefault(int(row[along]), []).append(float(row[value]))
    return {key: [(step, sum(found) / len(found)) for step, found in sorted(steps.items())]
            for key, steps in values.items()}


def environment_tags() -> dict[str, str]:
    """Git commit and dirty flag of the working directory, host, user and SLURM job id."""
    tags = {"host": socket.gethostname()}
    # One git call gives both: header lines `# ...`, among them `# branch.oid <sha>` (`(initial)` before
    # the first commit), then one line per changed or untracked file; nothing outside a repository.
    lines = _git("status", "--porcelain=v2", "--branch").splitlines()
    commit = next((line.split()[2] for line in lines if line.startswith("# branch.oid ")), "(initial)")
    if commit != "(initial)":
        tags["mlflow.source.git.commit"] = commit
        tags["git_dirty"] = str(any(not line.startswith("# ") for line in lines)).lower()
    with contextlib.suppress(OSError, KeyError):
        tags["mlflow.user"] = getpass.getuser()
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    return tags


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _peak_gpu() -> dict:
    """{"peak_gpu_mib": the peak GPU memory torch allocated} when this job used CUDA, else {}."""
    torch = sys.modules.get("torch")  # is_initialized starts no driver (a CPU job, a tables job)
    if torch is None or not torch.cuda.is_initialized():
        return {}
    return {"peak_gpu_mib": torch.cuda.max_memory_allocated() / (1 << 20)}


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout if done.returncode == 0 else ""
