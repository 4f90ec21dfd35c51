"""GPU slots on one machine: the default profile caps GPU jobs at the GPU count, each job claims its own GPU."""

import itertools
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vitplasticity import gpus
from vitplasticity.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
# A GPU job's start as the package's jobs do it, then what the test checks: its slot and when it ran.
JOB = ("import time; from vitplasticity.gpus import claim_gpu; slot = claim_gpu(); began = time.time(); "
       "time.sleep(1.5); print(slot, began, time.time())")


def test_gpu_count_reads_the_override_and_refuses_nonsense():
    assert gpus.gpu_count({gpus.GPUS_ENV: "3"}) == 3
    assert gpus.gpu_count({gpus.GPUS_ENV: "0"}) == 0
    with pytest.raises(UserError, match="VITPLASTICITY_GPUS='two' is not a number of GPUs; set it to 0 or more"):
        gpus.gpu_count({gpus.GPUS_ENV: "two"})


def test_claim_leaves_devices_chosen_by_a_scheduler_alone(tmp_path):
    environ = {gpus.GPUS_ENV: "4", "CUDA_VISIBLE_DEVICES": "2"}
    assert gpus.claim_gpu(environ, lock_dir=tmp_path) is None
    assert environ["CUDA_VISIBLE_DEVICES"] == "2"
    assert gpus.claim_gpu({gpus.GPUS_ENV: "0"}, lock_dir=tmp_path) is None


def _workflow(folder: Path) -> None:
    """A tiny workflow beside a copy of the real default profile: 4 `finetune` jobs that record their slot."""
    (folder / "profiles").mkdir()
    shutil.copytree(ROOT / "profiles" / "default", folder / "profiles" / "default")
    (folder / "Snakefile").write_text(textwrap.dedent('''
        rule all:
            input: expand("slot{i}.txt", i=range(4))
        rule finetune:
            output: "slot{i}.txt"
            shell: "{python} -c '{job}' > {output}"
    ''').replace("{python}", sys.executable).replace("{job}", JOB))
    (folder / "other").mkdir()
    (folder / "other" / "config.yaml").write_text("cores: 4\n")


def _snakemake(folder: Path, *args, gpus_env: str):
    env = dict(os.environ, **{gpus.GPUS_ENV: gpus_env})
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_two_slots_run_at_most_two_jobs_at_once_each_on_its_own_gpu(tmp_path):
    _workflow(tmp_path)
    done = _snakemake(tmp_path, "--cores", "4", gpus_env="2")
    assert done.returncode == 0, done.stderr[-2000:]
    jobs = [tuple(float(v) for v in (tmp_path / f"slot{i}.txt").read_text().split()) for i in range(4)]
    assert sorted({int(slot) for slot, _, _ in jobs}) == [0, 1]
    for (slot_a, start_a, end_a), (slot_b, start_b, end_b) in itertools.combinations(jobs, 2):
        if start_a < end_b and start_b < end_a:  # overlapping in time: never the same GPU
            assert slot_a != slot_b
    edges = sorted([(start, 1) for _, start, _ in jobs] + [(end, -1) for _, _, end in jobs])
    running = list(itertools.accumulate(change for _, change in edges))
    assert max(running) == 2


def test_the_profile_adds_gpu_requests_only_to_local_runs_with_gpus(tmp_path):
    _workflow(tmp_path)
    local = _snakemake(tmp_path, "-n", "--cores", "4", gpus_env="2")
    assert local.stdout.count("gpu=1") == 4, local.stdout
    without = _snakemake(tmp_path, "-n", "--cores", "4", gpus_env="0")
    assert "gpu=" not in without.stdout
    # Another profile (SLURM's, on a cluster) gets nothing from the workflow profile.
    other = _snakemake(tmp_path, "-n", "--profile", "other", gpus_env="2")
    assert other.returncode == 0 and "gpu=" not in other.stdout
