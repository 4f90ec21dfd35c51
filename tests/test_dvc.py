"""DVC versioning of the study: its outputs are every folder the quick study writes; the push sequence of
docs/dvc.md, params, pull into a fresh clone, then the exact Snakemake plans after a science change.

The repository is copied into a temporary git repository whose config/quick.yaml is the smoke
study. To keep the test short, the outputs of the session's smoke run are copied in and only
the tables and figures are left for Snakemake to make.
"""

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, SMOKE_CONFIG, planned_jobs, snakemake

STAGE = "quick_study"
# .dvc/config's default remote, `../../vitplasticity-dvc-storage` from .dvc/: a sibling of the repository.
REMOTE = "vitplasticity-dvc-storage"
PROJECT_FILES = ["Snakefile", "dvc.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore"]
PROJECT_DIRS = ["workflow", "config", "envs", "scripts", "src/vitplasticity"]
REMADE = ["results/tables", "results/figures"]
NOTHING_TO_DO = "Nothing to be done"


def run(cwd: Path, env: dict, *command: str, check: bool = True, timeout: int = 600):
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def dvc(cwd: Path, env: dict, *args: str, **kwargs):
    return run(cwd, env, sys.executable, "-m", "dvc", *args, **kwargs)


def snakemake_dry_run(cwd: Path, env: dict, config: str = "config/quick.yaml") -> str:
    result = run(cwd, env, sys.executable, "-m", "snakemake", "-n", "--configfile", config)
    return result.stdout + result.stderr


def changed_config(repo: Path, path: Path, change) -> str:
    """A copy of the repository's quick config with `change(config)` applied; its path."""
    config = yaml.safe_load((repo / "config" / "quick.yaml").read_text())
    change(config)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def status(cwd: Path, env: dict) -> dict:
    return json.loads(dvc(cwd, env, "status", "--json").stdout)


def out_paths(repo: Path) -> list[str]:
    outs = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"][STAGE]["outs"]
    return [next(iter(out)) if isinstance(out, dict) else out for out in outs]


def digests(repo: Path) -> dict[str, str]:
    """sha256 of every file in the stage's outputs, by path relative to the repository."""
    found = {}
    for out in out_paths(repo):
        for path in sorted((repo / out).rglob("*")):
            if path.is_file():
                found[path.relative_to(repo).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def mtimes(repo: Path, outs: list[str]) -> dict[str, int]:
    return {p.relative_to(repo).as_posix(): p.stat().st_mtime_ns
            for out in outs for p in (repo / out).rglob("*") if p.is_file()}


def test_dvc_versions_every_folder_the_quick_study_writes_and_no_other(tmp_path):
    """Every output file of the quick study's plan (criteria, trajectory and controls on) lies in a folder
    of dvc.yaml's outs, and each of those folders holds some output."""
    summary = snakemake(tmp_path, "-n", "--summary", config=ROOT / "config" / "quick.yaml").stdout
    rows = [line.split("\t") for line in summary.splitlines() if "\t" in line]
    assert rows[0][0] == "output_file"
    outputs = [row[0] for row in rows[1:]]
    assert "results/criteria/vit_quick/shapes_novel/criteria.csv" in outputs
    assert "results/pretrain/vit_quick/trajectory/trajectory.csv" in outputs
    outs = out_paths(ROOT)
    unversioned = [path for path in outputs if not any(path.startswith(f"{out}/") or path == out for out in outs)]
    assert unversioned == []
    assert [out for out in outs if not any(path.startswith(f"{out}/") or path == out for path in outputs)] == []


def test_the_stage_params_are_sections_of_the_quick_and_smoke_configs():
    """`dvc commit` refuses a stage whose params name a section the config lacks (a new config section must be
    added to dvc.yaml's params and written out in the smoke study, which the push test runs as quick.yaml)."""
    params = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][STAGE]["params"]
    listed = [key for entry in params for key in entry["config/quick.yaml"]]
    assert "selection" in listed and "criteria" in listed
    for config in (ROOT / "config" / "quick.yaml", SMOKE_CONFIG):
        assert sorted(set(listed) - yaml.safe_load(config.read_text()).keys()) == [], config.name


@pytest.fixture
def env(tmp_path):
    """The test's interpreter first on PATH (dvc.yaml's command is `snakemake`), offline DVC, a git identity."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "snakemake"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m snakemake "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    variables = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1",
                     MPLBACKEND="Agg", VITPLASTICITY_PYTHON=sys.executable, GIT_AUTHOR_NAME="test",
                     GIT_AUTHOR_EMAIL="test@example.org", GIT_COMMITTER_NAME="test",
                     GIT_COMMITTER_EMAIL="test@example.org")
    for name in ("DVC_TEST", "DVC_SITE_CACHE_DIR", "GIT_DIR", "GIT_WORK_TREE"):
        variables.pop(name, None)
    return variables


def make_repo(repo: Path, env: dict, site_cache: Path) -> None:
    """The project's workflow, DVC files and scripts in a fresh git repository; the smoke study as quick.yaml."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in PROJECT_DIRS:
        shutil.copytree(ROOT / name, repo / name, ignore=ignore)
    for name in PROJECT_FILES:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, repo / name)
    shutil.copy2(SMOKE_CONFIG, repo / "config" / "quick.yaml")
    run(repo, env, "git", "init", "-q")
    run(repo, env, "git", "add", "-A")
    run(repo, env, "git", "commit", "-q", "--no-verify", "-m", "project")
    # Keep DVC's per-repository index inside the test's folder (default: a system temp folder).
    dvc(repo, env, "config", "--local", "core.site_cache_dir", str(site_cache))


@pytest.mark.slow
def test_push_after_a_study_then_pull_into_a_fresh_clone_and_change_it(smoke_run, tmp_path, env):
    repo, site_cache = tmp_path / "repo", tmp_path / "site-cache"
    make_repo(repo, env, site_cache)

    # The project config alone (no DVC_NO_ANALYTICS, no CI) turns analytics and update checks off.
    config_only = {k: v for k, v in env.items() if k not in ("DVC_NO_ANALYTICS", "CI")}
    log = dvc(repo, config_only, "version", "-v")
    assert "Check for update is disabled." in log.stdout + log.stderr
    assert "Analytics is disabled." in log.stdout + log.stderr
    assert dvc(repo, env, "remote", "default").stdout.strip() == "storage"

    # Outputs of a finished smoke study (file times kept) less the tables and figures.
    for name in ("data", "results"):
        shutil.copytree(smoke_run / name, repo / name, symlinks=True)
    for name in REMADE:
        shutil.rmtree(repo / name)
    # The MLflow mirror's run record (a run id in this machine's store) is not versioned (.dvcignore).
    mirror = next((repo / "results" / "runs").rglob("metrics.json")).with_name("mlflow_run.json")
    mirror.write_text('{"run_id": "a"}')
    kept = [out for out in out_paths(repo) if out not in REMADE]
    before = mtimes(repo, kept)
    assert before

    # Pushing an unfinished study is refused with one line.
    refused = run(repo, env, "bash", "scripts/dvc-push.sh", check=False)
    assert refused.returncode == 1
    assert refused.stderr.splitlines()[-1] == ("dvc-push: the study is not finished (snakemake -n --configfile "
                                               "config/quick.yaml plans jobs); run snakemake, then push")
    assert not (repo / "dvc.lock").exists()

    # docs/dvc.md's sequence: the quick study with plain Snakemake (it remakes only what is missing),
    # then the push script, which records dvc.lock and pushes everything.
    run(repo, env, sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", "config/quick.yaml")
    assert (repo / "results" / "tables" / "main" / "main_table.csv").is_file()
    assert mtimes(repo, kept) == before
    run(repo, env, "bash", "scripts/dvc-push.sh")
    assert status(repo, env) == {}
    # The smoke study measures no criteria: their folder is recorded empty (DVC commits no missing output).
    assert list((repo / "results" / "criteria").iterdir()) == []
    workspace = digests(repo)
    recorded = {path: digest for path, digest in workspace.items() if not path.endswith("/mlflow_run.json")}
    for path in recorded:  # every output file's content is on the remote (DVC 3 layout: files/md5/ab/cdef...)
        md5 = hashlib.md5((repo / path).read_bytes()).hexdigest()
        assert (tmp_path / REMOTE / "files" / "md5" / md5[:2] / md5[2:]).is_file(), path
    assert "data/checkpoints/vit_smoke.safetensors" in recorded
    assert "results/tables/main/main_table.csv" in recorded
    mirror.write_text('{"run_id": "b"}')
    assert status(repo, env) == {}
    # The root .gitignore already covers every output: DVC adds no .gitignore files of its own.
    assert run(repo, env, "git", "status", "--porcelain").stdout.splitlines() == ["?? dvc.lock"]
    run(repo, env, "git", "add", "dvc.lock")
    run(repo, env, "git", "commit", "-q", "--no-verify", "-m", "study")

    # A changed science parameter shows in `dvc status` and `dvc params diff`; reverting it clears both.
    config_path = repo / "config" / "quick.yaml"
    original = config_path.read_text()
    config = yaml.safe_load(original)
    old = config["plasticity"]["n_pairs"]
    config["plasticity"]["n_pairs"] = old * 2
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert status(repo, env) == {STAGE: [{"changed deps": {"config/quick.yaml": {"plasticity": "modified"}}}]}
    diff = json.loads(dvc(repo, env, "params", "diff", "--json").stdout)
    assert diff == {"config/quick.yaml": {"plasticity.n_pairs": {"old": old, "new": old * 2, "diff": old}}}
    # A machine setting is no parameter of the stage.
    config["plasticity"]["n_pairs"] = old
    config["runtime"]["eval_batch"] = 32
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert status(repo, env) == {}
    config_path.write_text(original)
    assert status(repo, env) == {}
    assert json.loads(dvc(repo, env, "params", "diff", "--json").stdout) == {}

    # A fresh clone (no outputs, no cache, no .snakemake) finds the same remote with no setup; after the
    # pull script Snakemake has nothing to do, and a science change plans exactly what it touches.
    clone = tmp_path / "clone"
    run(tmp_path, env, "git", "clone", "-q", str(repo), str(clone))
    dvc(clone, env, "config", "--local", "core.site_cache_dir", str(tmp_path / "clone-site-cache"))
    run(clone, env, "bash", "scripts/dvc-pull.sh")
    assert digests(clone) == recorded
    assert (clone / "results" / "criteria").is_dir()
    assert status(clone, env) == {}
    assert NOTHING_TO_DO in snakemake_dry_run(clone, env)

    def more_training_images(config):
        config["tasks"]["novel"]["data"]["n_train"] += 1

    plan = planned_jobs(snakemake_dry_run(clone, env, changed_config(clone, tmp_path / "n_train.yaml",
                                                                     more_training_images)))
    arms, lrs, seeds = len(config["arms"]), len(config["tasks"]["novel"]["lrs"]), len(config["finetune"]["seeds"])
    assert plan == {"prepare_dataset": 1, "finetune": arms * lrs * seeds, "linear_probe": 1, "measure_plasticity": 1,
                    "compute_bounds": 1, "measure_trajectory": 1, "aggregate": 1, "figures": 1, "all": 1}

    def one_more_rate(config):
        config["tasks"]["novel"]["lrs"].append(0.05)

    plan = planned_jobs(snakemake_dry_run(clone, env, changed_config(clone, tmp_path / "lr.yaml", one_more_rate)))
    assert plan == {"finetune": arms * seeds, "aggregate": 1, "figures": 1, "all": 1}
