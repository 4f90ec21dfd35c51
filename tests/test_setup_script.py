"""scripts/setup.sh picks a supported Python (3.11 to 3.13), says which in one line, and refuses
in one line, creating nothing, when there is none.

The interpreters are fakes: shell scripts that report a given version, log how they were called,
and make a .venv whose python is a copy of themselves. PATH holds only them and the few tools
the script needs, so the machine's own Pythons stay out of sight.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ["bash", "sed", "dirname", "basename", "mkdir", "cp", "rm"]

FAKE = """#!/bin/sh
echo "$(basename "$0") $*" >> "$SETUP_LOG"
case "$1 $2" in
    "-c "*) echo {version} ;;
    "-m venv") mkdir -p "$3/bin" && cp "$0" "$3/bin/python" {venv_fails} ;;
esac
"""


@pytest.fixture
def project(tmp_path):
    """A copy of the files setup.sh reads, a bin folder for fakes and one with the tools it runs."""
    (tmp_path / "project" / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "project" / "scripts")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "project")
    (tmp_path / "bin").mkdir()
    (tmp_path / "tools").mkdir()
    for tool in TOOLS:
        (tmp_path / "tools" / tool).symlink_to(shutil.which(tool))
    return tmp_path


def fake(project, name, version, venv_fails=False):
    """A fake interpreter `name` in the fakes' folder that reports `version`."""
    path = project / "bin" / name
    path.write_text(FAKE.format(version=version, venv_fails="&& exit 1" if venv_fails else ""))
    path.chmod(0o755)
    return path


def shim(project, name):
    """An interpreter that does not run, as a pyenv shim of an inactive version."""
    path = project / "bin" / name
    path.write_text(f"#!/bin/sh\necho 'pyenv: {name}: command not found' >&2\nexit 127\n")
    path.chmod(0o755)


def run_setup(project, **env):
    environment = {
        "PATH": f"{project / 'bin'}:{project / 'tools'}",
        "HOME": str(project),
        "SETUP_LOG": str(project / "calls.log"),
        **env,
    }
    return subprocess.run(
        [shutil.which("bash"), str(project / "project" / "scripts" / "setup.sh")],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def calls(project):
    log = project / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


NONE_FOUND = (
    "setup.sh: error: no Python 3.11 to 3.13 on PATH{found}: install one (Debian/Ubuntu: apt install "
    "python3.13-venv; or conda, pyenv, uv) or name it with PYTHON=/path/to/python3.13\n"
)


def test_no_python_at_all(project):
    result = run_setup(project)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == NONE_FOUND.format(found="")
    assert not (project / "project" / ".venv").exists()


def test_only_unsupported_pythons_are_named_and_nothing_is_created(project):
    fake(project, "python3", "3.10.12")
    fake(project, "python3.14", "3.14.0")  # not a candidate: newer than requires-python allows
    shim(project, "python3.12")
    result = run_setup(project)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == NONE_FOUND.format(found=" (python3 is 3.10.12)")
    assert not (project / "project" / ".venv").exists()
    assert not any(" -m " in call for call in calls(project))


def test_python3_when_supported(project):
    fake(project, "python3", "3.12.1")
    fake(project, "python3.13", "3.13.0")
    result = run_setup(project)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"setup.sh: using python3 (Python 3.12.1, {project / 'bin' / 'python3'})\n"
    assert calls(project)[-4:] == [
        "python3 -m venv .venv",
        "python -m pip install --quiet --upgrade pip",
        "python -m pip install --quiet -c requirements.lock torch==2.14.1 torchvision==0.29.1",
        "python -m pip install --quiet -c requirements.lock -e .[test,slurm]",
    ]


def test_newest_supported_when_python3_is_not(project):
    fake(project, "python3", "3.10.12")
    shim(project, "python3.13")
    fake(project, "python3.12", "3.12.1")
    fake(project, "python3.11", "3.11.7")
    result = run_setup(project)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"setup.sh: using python3.12 (Python 3.12.1, {project / 'bin' / 'python3.12'})\n"
    assert "python3.12 -m venv .venv" in calls(project)
    assert (project / "project" / ".venv" / "bin" / "python").exists()


def test_explicit_python_wins_and_an_unsupported_one_is_refused(project):
    fake(project, "python3.13", "3.13.0")
    chosen = fake(project, "python3.11", "3.11.7")
    result = run_setup(project, PYTHON=str(chosen))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"setup.sh: using {chosen} (Python 3.11.7, {chosen})\n"

    too_new = fake(project, "python3.14", "3.14.0")
    shutil.rmtree(project / "project" / ".venv")
    result = run_setup(project, PYTHON=str(too_new))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        f"setup.sh: error: PYTHON={too_new} is Python 3.14.0; vitplasticity needs Python 3.11 to 3.13: "
        "set PYTHON to one of those\n"
    )
    assert not (project / "project" / ".venv").exists()

    result = run_setup(project, PYTHON="python3.9")
    assert result.stderr == (
        "setup.sh: error: PYTHON=python3.9 is not a Python that runs; vitplasticity needs Python 3.11 to 3.13: "
        "set PYTHON to one of those\n"
    )


def test_existing_venv_of_an_unsupported_version_is_refused_and_kept(project):
    fake(project, "python3", "3.12.1")
    old = project / "project" / ".venv" / "bin"
    old.mkdir(parents=True)
    shutil.copy(fake(project, "python3.10", "3.10.12"), old / "python")
    result = run_setup(project)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        "setup.sh: error: .venv holds Python 3.10.12, and vitplasticity needs Python 3.11 to 3.13: "
        "remove it (rm -rf .venv) and run setup.sh again\n"
    )
    assert (old / "python").exists()
    assert not any("pip" in call for call in calls(project))

    (old / "python").unlink()
    result = run_setup(project)
    assert result.stderr == (
        "setup.sh: error: .venv holds no working Python, and vitplasticity needs Python 3.11 to 3.13: "
        "remove it (rm -rf .venv) and run setup.sh again\n"
    )


def test_existing_supported_venv_is_reused_unless_python_names_another_version(project):
    fake(project, "python3", "3.12.1")
    assert run_setup(project).returncode == 0
    result = run_setup(project)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "setup.sh: using the existing .venv (Python 3.12.1)\n"
    assert sum("-m venv" in call for call in calls(project)) == 1

    other = fake(project, "python3.13", "3.13.0")
    result = run_setup(project, PYTHON=str(other))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        f"setup.sh: error: .venv holds Python 3.12.1, not PYTHON={other}'s 3.13.0: "
        f"remove it (rm -rf .venv) to rebuild it with {other}\n"
    )


def test_a_venv_that_cannot_be_made_is_removed(project):
    fake(project, "python3", "3.12.1", venv_fails=True)
    result = run_setup(project)
    assert result.returncode == 1
    assert result.stdout == f"setup.sh: using python3 (Python 3.12.1, {project / 'bin' / 'python3'})\n"
    assert result.stderr == (
        "setup.sh: error: python3 could not create .venv (no venv module or ensurepip; Debian/Ubuntu: "
        "apt install python3.12-venv); nothing was left behind\n"
    )
    assert not (project / "project" / ".venv").exists()
