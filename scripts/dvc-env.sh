# Shared by dvc-push.sh and dvc-pull.sh (sourced): the repository root, the study's config and
# DVC stage (arguments 1 and 2), and the interpreter (VITPLASTICITY_PYTHON, else .venv, else python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
configfile="${1:-config/quick.yaml}"
stage="${2:-quick_study}"
python="${VITPLASTICITY_PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
export DVC_NO_ANALYTICS=1
