#!/usr/bin/env bash
# Fetch the study's versioned data and results from the DVC remote, then mark them up to date
# for Snakemake. DVC does not keep file times, so right after a pull Snakemake would see inputs
# newer than outputs and rerun the study; `snakemake --touch` fixes the times without running
# anything.
#
#   bash scripts/dvc-pull.sh                      # the quick study (config/quick.yaml)
#   bash scripts/dvc-pull.sh config/config.yaml   # another study's config file
#
# VITPLASTICITY_PYTHON picks the interpreter (default: .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
configfile="${1:-config/quick.yaml}"
python="${VITPLASTICITY_PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
export DVC_NO_ANALYTICS=1
"$python" -m dvc pull
"$python" -m snakemake --touch --cores 1 --configfile "$configfile"
