"""Concurrency: jobs never share an output, log or run folder; a second Snakemake on the same folder
is refused by its lock and changes nothing."""

from __future__ import annotations

import re
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, snakemake
from jobkit import KILL_TIMEOUT_S, snapshot, start_workflow, vitplasticity_jobs

from vitplasticity.registry import FIGURES, TABLES

pytestmark = pytest.mark.reliability


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


# Rules that keep more files (state.pt, record.json, mlflow_run.json) in the folder of this output.
RUN_FOLDER_RECORD = {"finetune": "metrics.json", "pretrain_checkpoint": "metrics.json", "linear_probe": "metrics.json",
                     "measure_plasticity": "plasticity.csv", "measure_criteria": "criteria.csv",
                     "measure_trajectory": "trajectory.csv"}


# The paper study (arms + the main experiment's controls) and the quick one (which pretrains, with a trajectory).
@pytest.mark.parametrize(("config", "finetune_runs"), [("config.yaml", 3816), ("quick.yaml", 141)])
def test_no_two_jobs_of_a_study_write_the_same_file_or_run_folder(config, finetune_runs, tmp_path):
    result = snakemake(tmp_path, "-n", config=ROOT / "config" / config, timeout=600)
    planned = _dry_run_jobs(result.stdout)
    assert len([j for j in planned if j["rule"] == ["finetune"]]) == finetune_runs
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
    # Every job that leaves a record (records.FILE, and mlflow_run.json beside it) has a folder of its own
    # for it; an experiment's tables and figures folders also hold the paper comparison, which keeps none.
    with_record = RUN_FOLDER_RECORD | {"aggregate": f"{TABLES[0]}.csv", "figures": f"{FIGURES[0]}.png"}
    folders = [str(Path(next(p for p in job["writes"] if Path(p).name == with_record[job["rule"][0]])).parent)
               for job in planned if job["rule"][0] in with_record]
    assert len(folders) == len(set(folders)), "two jobs keep their records in the same folder"


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
