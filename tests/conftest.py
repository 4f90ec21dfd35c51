"""Shared fixtures: the repository root, one finished run of the smoke workflow, and the job kit."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SMOKE_CONFIG = ROOT / "tests" / "data" / "smoke.yaml"


def smoke_config() -> dict:
    """A fresh copy of the smoke study's config, to change."""
    return yaml.safe_load(SMOKE_CONFIG.read_text())


def write_config(path: Path, config: dict) -> Path:
    """Write a changed config for `snakemake(..., config=path)`."""
    path.write_text(yaml.safe_dump(config, sort_keys=False))  # keep the user's order
    return path


# Snakemake's own note, on every run, that it loaded the local profile (profiles/default).
PROFILE_NOTE = "Using workflow specific profile profiles/default for setting default command line arguments.\n"


def snakemake(workdir: Path, *args: str, config: Path = SMOKE_CONFIG, check: bool = True, timeout: int = 900):
    """Run the repository's workflow in `workdir` with the interpreter running the tests; its stderr
    without Snakemake's profile note, so that tests see the workflow's own lines."""
    command = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(workdir),
               "--configfile", str(config), *args]
    env = dict(os.environ, DVC_NO_ANALYTICS="1", MPLBACKEND="Agg")
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    result.stderr = result.stderr.replace(PROFILE_NOTE, "", 1)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def planned_jobs(output: str) -> dict[str, int]:
    """Job counts from a dry run's 'Job stats' table."""
    counts, inside = {}, False
    for line in output.splitlines():
        parts = line.split()
        if line.startswith("job ") and "count" in line:
            inside = True
            continue
        if inside:
            if not parts or parts[0] == "total":
                break
            if len(parts) == 2 and parts[1].isdigit():
                counts[parts[0]] = int(parts[1])
    return counts


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The smoke study run once to completion; tests copy it before changing anything."""
    workdir = tmp_path_factory.mktemp("smoke")
    snakemake(workdir, "--cores", "2")
    return workdir


@pytest.fixture
def smoke_copy(smoke_run, tmp_path):
    """A private copy of the finished smoke study (file times preserved)."""
    target = tmp_path / "study"
    # Snakemake's metadata (params, code, input sets) travels with the copy; its locks do not.
    shutil.copytree(smoke_run, target, symlinks=True, ignore=shutil.ignore_patterns("locks", "log", "incomplete"))
    return target


@pytest.fixture(scope="session")
def kit(tmp_path_factory) -> Path:
    """A prepared synthetic task and a randomly initialised checkpoint, as the workflow would hand them to
    a job (`jobkit`); tests that change it take `case`."""
    from jobkit import build_kit

    return build_kit(tmp_path_factory.mktemp("kit"))


@pytest.fixture
def case(kit, tmp_path) -> Path:
    """A private copy of the kit to damage."""
    shutil.copytree(kit, tmp_path / "case")
    return tmp_path / "case"


@pytest.fixture
def settled_copy(smoke_copy) -> Path:
    """The smoke copy after a plain rerun, so a test sees only the effect of its own change."""
    snakemake(smoke_copy, "--cores", "2")
    return smoke_copy
