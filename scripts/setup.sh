#!/usr/bin/env bash
# Create .venv with the pinned stack and the package installed editable (idempotent).
#
# The interpreter: $PYTHON when set; otherwise python3 when its version is supported (the one
# the system, or an activated conda/pyenv environment, makes the default), else the newest
# supported python3.X on PATH. The supported versions are pyproject.toml's requires-python.
# Every refusal is one line on stderr, before anything is created.
set -euo pipefail
cd "$(dirname "$0")/.."

# requires-python reads ">=3.A,<3.B": the supported versions are 3.A to 3.(B-1).
spec=$(sed -n 's/^requires-python = "\(.*\)"$/\1/p' pyproject.toml)
if [[ ! $spec =~ ^\>=3\.([0-9]+),\<3\.([0-9]+)$ ]]; then
    echo "setup.sh: error: pyproject.toml's requires-python '$spec' is not of the form '>=3.A,<3.B'" >&2
    exit 1
fi
lowest=${BASH_REMATCH[1]} highest=$((BASH_REMATCH[2] - 1))
wanted="Python 3.$lowest to 3.$highest"

# The version (3.12.1) of interpreter $1; empty when it does not run (a pyenv shim of an
# inactive version, a broken link).
version_of() { "$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null || true; }
# "Python 3.12.1" for a version, $2 for none.
described() { if [[ -n $1 ]]; then echo "Python $1"; else echo "$2"; fi; }
supported() { [[ $1 =~ ^3\.([0-9]+)\. ]] && ((BASH_REMATCH[1] >= lowest && BASH_REMATCH[1] <= highest)); }

python=""
if [[ -n ${PYTHON:-} ]]; then
    version=$(version_of "$PYTHON")
    if ! supported "$version"; then
        echo "setup.sh: error: PYTHON=$PYTHON is $(described "$version" "not a Python that runs"); vitplasticity needs $wanted: set PYTHON to one of those" >&2
        exit 1
    fi
    python=$PYTHON
fi

if [[ -e .venv ]]; then
    existing=$(version_of .venv/bin/python)
    if ! supported "$existing"; then
        echo "setup.sh: error: .venv holds $(described "$existing" "no working Python"), and vitplasticity needs $wanted: remove it (rm -rf .venv) and run setup.sh again" >&2
        exit 1
    fi
    if [[ -n $python && ${existing%.*} != "${version%.*}" ]]; then
        echo "setup.sh: error: .venv holds Python $existing, not PYTHON=$PYTHON's $version: remove it (rm -rf .venv) to rebuild it with $PYTHON" >&2
        exit 1
    fi
    echo "setup.sh: using the existing .venv (Python $existing)"
else
    if [[ -z $python ]]; then
        candidates=(python3)
        for ((minor = highest; minor >= lowest; minor--)); do candidates+=("python3.$minor"); done
        others=""
        for candidate in "${candidates[@]}"; do
            command -v "$candidate" > /dev/null || continue
            version=$(version_of "$candidate")
            if supported "$version"; then
                python=$candidate
                break
            fi
            if [[ -n $version ]]; then others+="${others:+, }$candidate is $version"; fi
        done
        if [[ -z $python ]]; then
            echo "setup.sh: error: no $wanted on PATH${others:+ ($others)}: install one (Debian/Ubuntu: apt install python3.$highest-venv; or conda, pyenv, uv) or name it with PYTHON=/path/to/python3.$highest" >&2
            exit 1
        fi
    fi
    echo "setup.sh: using $python (Python $version, $(command -v "$python"))"
    if ! "$python" -m venv .venv > /dev/null 2>&1; then
        rm -rf .venv
        echo "setup.sh: error: $python could not create .venv (no venv module or ensurepip; Debian/Ubuntu: apt install python${version%.*}-venv); nothing was left behind" >&2
        exit 1
    fi
fi

.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and pinned: an unpinned torch would pull a multi-GB build from the index.
.venv/bin/python -m pip install --quiet -c requirements.lock torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install --quiet -c requirements.lock -e ".[test,slurm]"
