#!/usr/bin/env bash
# Fetch the study's versioned data and results from the DVC remote, then record them as
# up to date for Snakemake.
#
# DVC keeps neither file times nor Snakemake's provenance (.snakemake/metadata: each output's
# params, code and inputs). Once `dvc status` confirms that the pulled files are those dvc.lock
# recorded with this checkout's config and code, `snakemake --touch --forceall` orders the file
# times and writes that provenance for every output, without running anything. From then on a
# changed parameter reruns exactly the jobs it touches (docs/dvc.md, "After a pull").
#
#   bash scripts/dvc-pull.sh                                   # the quick study (config/quick.yaml)
#   bash scripts/dvc-pull.sh config/config.yaml paper_study    # another study's config and stage
#
# VITPLASTICITY_PYTHON picks the interpreter (default: .venv/bin/python, else python3).
set -euo pipefail
source "$(dirname "$0")/dvc-env.sh"
"$python" -m dvc pull "$stage"
status="$("$python" -m dvc status "$stage")"
if ! grep -q "up to date" <<<"$status"; then
    printf '%s\n' "$status" >&2
    echo "dvc-pull: the config or code differs from what dvc.lock recorded (above); check out the commit that made it, then run this again" >&2
    exit 1
fi
"$python" -m snakemake --touch --forceall --cores 1 --configfile "$configfile"
