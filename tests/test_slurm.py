"""The study on a real single-node SLURM through workflow/profiles/slurm.

tests/slurm/cluster.sh starts the cluster (munge, MariaDB, slurmdbd, slurmctld, slurmd)
in a temporary directory. Without the SLURM packages (.ci/install-slurm.sh) or without
root these tests are skipped, unless VITPLASTICITY_REQUIRE_SLURM=1 makes that a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
PROFILE = REPO / "workflow" / "profiles" / "slurm"
SMOKE = REPO / "tests" / "data" / "smoke.yaml"
REQUIRED = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "sbatch", "sacct")
GPU_RULES = {"pretrain_checkpoint", "finetune", "measure_plasticity", "measure_trajectory", "linear_probe"}
# Seconds one Snakemake invocation may take before it is interrupted (SIGINT cancels
# its SLURM jobs; SIGTERM would make it wait for them).
RUN_LIMIT = int(os.environ.get("VITPLASTICITY_SLURM_TEST_LIMIT", "1500"))
# The finetuning run that test_cancelled_finetune_resumes interrupts.
RESUME_TARGET = "results/runs/vit_smoke/novel/sgd/all/lr0.01_seed0"
RESUME_STEPS, RESUME_EVAL_EVERY = 1500, 50


def _unavailable(reason: str) -> None:
    if os.environ.get("VITPLASTICITY_REQUIRE_SLURM") == "1":
        pytest.fail(f"VITPLASTICITY_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


def _tail(path: Path, lines: int = 60) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _cluster_logs(state: Path) -> str:
    logs = sorted((state / "log").glob("*.log"))
    return "\n".join(f"--- {log.name}\n{_tail(log, 15)}" for log in logs)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> dict[str, str]:
    """A running single-node SLURM; yields the environment its clients need."""
    missing = [tool for tool in REQUIRED if shutil.which(tool) is None]
    if missing:
        tools = ", ".join(missing)
        _unavailable(f"SLURM is not installed ({tools} not found); run .ci/install-slurm.sh")
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        _unavailable("snakemake-executor-plugin-slurm is missing: pip install -e '.[slurm]'")
    if os.geteuid() != 0:
        _unavailable("the test cluster must be started as root (slurmd launches the jobs)")
    state = tmp_path_factory.mktemp("slurm-cluster")
    # Nothing from a real cluster's settings in this shell may leak into the tests.
    clean = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("VITPLASTICITY_SLURM_", "SLURM_", "SBATCH_", "SRUN_"))
    }
    started = subprocess.run(
        ["bash", str(CLUSTER), "start", str(state)],
        # Two fake GPUs: GPU jobs of the smoke study run two at a time, one per core.
        env=dict(clean, VITPLASTICITY_SLURM_GPUS="2"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    try:
        if started.returncode != 0:
            logs = _cluster_logs(state)
            pytest.fail(f"tests/slurm/cluster.sh start failed:\n{started.stderr}\n{logs}")
        printed = subprocess.run(
            ["bash", "-c", 'eval "$(bash "$0" env "$1")" && env -0', str(CLUSTER), str(state)],
            env=clean,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        env = dict(item.split("=", 1) for item in printed.split("\0") if "=" in item)
        # The project's environment (snakemake, python -m vitplasticity) on PATH behind
        # the cluster's own bin directory, as on a login node with the env activated.
        prefix, venv_bin = env["PATH"].split(":", 1)[0], str(Path(sys.executable).parent)
        env["PATH"] = f"{prefix}:{venv_bin}:{env['PATH']}"
        env["VITPLASTICITY_SLURM_GPU_MODEL"] = "fake"
        env["MPLBACKEND"] = "Agg"
        yield env
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(state)], capture_output=True, timeout=300)


def _snakemake_command(workdir: Path, configfile: Path, *extra: str) -> list[str]:
    return [
        "timeout", "-s", "INT", "--kill-after=60", str(RUN_LIMIT),
        sys.executable, "-m", "snakemake",
        "-s", str(REPO / "Snakefile"),
        "--directory", str(workdir),
        "--configfile", str(configfile),
        "--profile", str(PROFILE),
        # Poll SLURM every few seconds instead of after 40 s (MinJobAge is 300 s).
        "--slurm-init-seconds-before-status-checks", "2",
        *extra,
        # One torch thread for the many small GPU jobs: the profile's 4 would oversubscribe
        # a small test machine many times over. This replaces the profile's set-threads
        # mapping, so pretrain_checkpoint keeps its rule's 2 threads (and CPU count).
        # Taking all remaining arguments, it comes last.
        "--set-threads", "finetune=1", "measure_plasticity=1", "linear_probe=1",
    ]  # fmt: skip


@contextmanager
def _snakemake(env, workdir, configfile, log: Path, *extra: str) -> Iterator[subprocess.Popen]:
    """Snakemake running in the background; interrupted (cancelling its jobs) on errors."""
    with log.open("w") as out:
        process = subprocess.Popen(
            _snakemake_command(workdir, configfile, *extra),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _finish(process: subprocess.Popen, log: Path) -> int:
    try:
        return process.wait(timeout=RUN_LIMIT + 120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"snakemake outlived its timeout:\n{_tail(log)}")


def _run(env, workdir, configfile, log: Path, *extra: str) -> int:
    with _snakemake(env, workdir, configfile, log, *extra) as process:
        return _finish(process, log)


def _slurm(env, *args: str) -> str:
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=True, timeout=60)
    return done.stdout


def _sacct(env, *selection: str) -> dict[str, dict[str, str]]:
    """sacct rows (allocations only) by job id."""
    fields = ["JobID", "State", "ExitCode", "Comment", "Timelimit", "ReqMem", "AllocCPUS",
              "AllocTRES", "JobName"]  # fmt: skip
    since = (datetime.now() - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")
    out = _slurm(env, "sacct", "-X", "-n", "-P", "-S", since, "-o", ",".join(fields), *selection)
    rows = [dict(zip(fields, line.split("|"), strict=True)) for line in out.splitlines()]
    return {row["JobID"]: row for row in rows}


@dataclass
class Job:
    """One job as Snakemake's log describes it."""

    rule: str
    local: bool
    jobid: str
    threads: int = 1
    resources: dict[str, str] = field(default_factory=dict)


def _jobs_in_log(text: str) -> list[Job]:
    jobs = []
    for block in re.finditer(r"^(local)?rule (\w+):\n((?:    .*\n)+)", text, re.MULTILINE):
        props = dict(re.findall(r"^    (\w+): (.*)$", block.group(3), re.MULTILINE))
        resources = dict(re.findall(r"(\w+)=([^,]*)", props.get("resources", "")))
        jobs.append(
            Job(
                rule=block.group(2),
                local=bool(block.group(1)),
                jobid=props["jobid"],
                threads=int(props.get("threads", 1)),
                resources=resources,
            )
        )
    return jobs


def _submissions(text: str) -> dict[str, str]:
    """Snakemake job id -> SLURM job id, from the plugin's submission messages."""
    pairs = re.findall(r"^Job (\d+) has been submitted with SLURM jobid (\d+)", text, re.MULTILINE)
    assert len(dict(pairs)) == len(pairs), f"a Snakemake job was submitted twice: {pairs}"
    return dict(pairs)


def _minutes(timelimit: str) -> int:
    """sacct Timelimit ([D-]HH:MM:SS) in minutes."""
    days, _, clock = timelimit.rpartition("-")
    hours, minutes, seconds = (int(part) for part in clock.split(":"))
    return (int(days or 0) * 24 + hours) * 60 + minutes + (seconds > 0)


def test_smoke_study_runs_as_one_slurm_job_per_snakemake_job(slurm, tmp_path):
    workdir, log = tmp_path / "study", tmp_path / "snakemake.log"
    workdir.mkdir()
    code = _run(slurm, workdir, SMOKE, log)
    text = log.read_text()
    assert code == 0, f"the smoke study failed on SLURM:\n{_tail(log)}"

    jobs = _jobs_in_log(text)
    total = int(re.search(r"^(\d+) of \1 steps \(100%\) done$", text, re.MULTILINE).group(1))
    assert len(jobs) == total, "every Snakemake job is described in the log"
    remote = [job for job in jobs if not job.local]
    local_rules = {job.rule for job in jobs if job.local}
    assert {"aggregate", "figures"} <= local_rules, "light rules run on the login node"
    assert {job.rule for job in remote} >= {
        "prepare_dataset", "pretrain_checkpoint", "measure_plasticity", "compute_bounds",
        "finetune", "linear_probe",
    }  # fmt: skip

    submitted = _submissions(text)
    assert sorted(submitted) == sorted(job.jobid for job in remote), (
        "each non-local Snakemake job is submitted exactly once, local jobs never"
    )
    run_id = re.search(r"^SLURM run ID: (\S+)$", text, re.MULTILINE).group(1)
    accounted = _sacct(slurm, "--name", run_id)
    assert sorted(accounted) == sorted(submitted.values()), (
        "sacct lists exactly one SLURM job per submitted Snakemake job"
    )
    assert Counter(row["Comment"].split("_wildcards_")[0] for row in accounted.values()) == (
        Counter(f"rule_{job.rule}" for job in remote)
    )
    finetunes = list((workdir / "results" / "runs").glob("*/*/*/*/*/metrics.json"))
    assert len(finetunes) == sum(job.rule == "finetune" for job in remote) == 20

    assert any(job.threads > 1 for job in remote), "a multi-core job checks --cpus-per-task"
    for job in remote:
        row = accounted[submitted[job.jobid]]
        where = f"{job.rule} (SLURM job {row['JobID']})"
        assert (row["State"], row["ExitCode"]) == ("COMPLETED", "0:0"), where
        # The profile's and the rules' resources are what SLURM allocated.
        assert _minutes(row["Timelimit"]) == int(job.resources["runtime"]), where
        assert row["ReqMem"] == f"{job.resources['mem_mb']}M", where
        assert int(row["AllocCPUS"]) == job.threads, where
        assert row["Comment"].startswith(f"rule_{job.rule}"), where
        # GPU rules get one GPU of the requested model (sbatch --gpus=fake:1), others none.
        tres = row["AllocTRES"].split(",")
        if job.rule in GPU_RULES:
            assert {"gres/gpu=1", "gres/gpu:fake=1"} <= set(tres), where
        else:
            assert not [item for item in tres if item.startswith("gres/gpu")], where


def _resume_config(tmp_path: Path) -> Path:
    """The smoke study with a finetuning run long enough to be cancelled halfway."""
    config = yaml.safe_load(SMOKE.read_text())
    config["tasks"]["novel"].update(steps=RESUME_STEPS, eval_every=RESUME_EVAL_EVERY)
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _running_finetune(env) -> str | None:
    out = _slurm(env, "squeue", "-h", "-t", "RUNNING", "-o", "%i|%k")
    for line in out.splitlines():
        job_id, comment = line.split("|", 1)
        if comment.startswith("rule_finetune"):
            return job_id
    return None


def _comparable(metrics: dict) -> dict:
    """metrics.json without what measures the machine rather than the run."""
    return {key: value for key, value in metrics.items() if key not in {"wall_time_s"}}


def test_cancelled_finetune_resumes_to_the_uninterrupted_result(slurm, tmp_path):
    workdir, configfile = tmp_path / "study", _resume_config(tmp_path)
    workdir.mkdir()
    run_dir = workdir / RESUME_TARGET
    target = f"{RESUME_TARGET}/metrics.json"
    log_file = workdir / (RESUME_TARGET.replace("results/runs/", "results/logs/finetune/") + ".log")

    # 1. The uninterrupted run (and everything it needs) as the reference.
    log = tmp_path / "reference.log"
    assert _run(slurm, workdir, configfile, log, target) == 0, _tail(log)
    reference = json.loads((run_dir / "metrics.json").read_text())
    reference_history = (run_dir / "history.csv").read_text()
    assert reference["status"] == "completed"
    assert reference["steps_done"] == RESUME_STEPS
    shutil.rmtree(run_dir)

    # 2. The same run, cancelled with scancel once it has saved state.pt.
    log = tmp_path / "cancelled.log"
    with _snakemake(slurm, workdir, configfile, log, target, "--retries", "0") as process:
        deadline, job_id = time.monotonic() + RUN_LIMIT, None
        while job_id is None or not (run_dir / "state.pt").exists():
            assert process.poll() is None, f"snakemake ended before the cancel:\n{_tail(log)}"
            assert time.monotonic() < deadline, "the finetuning job never saved state.pt"
            time.sleep(0.2)
            job_id = _running_finetune(slurm)
        _slurm(slurm, "scancel", job_id)
        code = _finish(process, log)
    assert code != 0, f"a cancelled job must fail the run:\n{_tail(log)}"
    assert "CANCELLED" in log.read_text()
    finished_early = "the run finished before scancel reached it; raise RESUME_STEPS"
    assert not (run_dir / "metrics.json").exists(), finished_early
    assert (run_dir / "state.pt").exists(), "the interrupted run keeps its state.pt"
    assert _sacct(slurm, "-j", job_id)[job_id]["State"].startswith("CANCELLED")

    # 3. Rerunning the same command resumes the run from state.pt.
    log = tmp_path / "resumed.log"
    assert _run(slurm, workdir, configfile, log, target) == 0, _tail(log)
    resumed_from = re.search(r"resuming from step (\d+)", log_file.read_text())
    assert resumed_from, f"the rerun did not resume:\n{_tail(log_file)}"
    assert 0 < int(resumed_from.group(1)) < RESUME_STEPS
    assert int(resumed_from.group(1)) % RESUME_EVAL_EVERY == 0
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert _comparable(resumed) == _comparable(reference)
    assert (run_dir / "history.csv").read_text() == reference_history
    assert not (run_dir / "state.pt").exists(), "a finished run removes its state.pt"
