#!/usr/bin/env bash
# Record a finished study in dvc.lock, then push its data and results to the DVC remote.
# `dvc push` alone pushes only what dvc.lock lists: after a study run with plain `snakemake`
# there is no dvc.lock yet (or an outdated one), and it would silently push nothing new.
#
#   bash scripts/dvc-push.sh                                   # the quick study (config/quick.yaml)
#   bash scripts/dvc-push.sh config/config.yaml paper_study    # another study's config and stage
#
# Then commit dvc.lock (git add dvc.lock && git commit). VITPLASTICITY_PYTHON picks the
# interpreter (default: .venv/bin/python, else python3).
set -euo pipefail
source "$(dirname "$0")/dvc-env.sh"
# Only a finished study is recorded: dvc.lock must describe outputs Snakemake considers up to date.
if ! plan="$("$python" -m snakemake -n --configfile "$configfile" 2>&1)"; then
    printf '%s\n' "$plan" | tail -n 5 >&2
    echo "dvc-push: snakemake -n --configfile $configfile failed (above); fix that first" >&2
    exit 1
fi
if ! grep -q "Nothing to be done" <<<"$plan"; then
    echo "dvc-push: the study is not finished (snakemake -n --configfile $configfile plans jobs); run snakemake, then push" >&2
    exit 1
fi
# A folder of the stage that this study leaves empty (criteria off, fetched checkpoints) is recorded
# empty: DVC refuses to commit a stage with a missing output.
"$python" - "$stage" <<'PY'
import sys
from pathlib import Path

import yaml

for out in yaml.safe_load(Path("dvc.yaml").read_text())["stages"][sys.argv[1]]["outs"]:
    Path(next(iter(out)) if isinstance(out, dict) else out).mkdir(parents=True, exist_ok=True)
PY
if ! committed="$("$python" -m dvc commit --force "$stage" 2>&1)"; then
    printf '%s\n' "$committed" | tail -n 5 >&2
    echo "dvc-push: dvc commit $stage failed (above); fix that, then push again" >&2
    exit 1
fi
"$python" -m dvc push
