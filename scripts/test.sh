#!/usr/bin/env bash
# The test command: lint, workflow lint, then the whole test suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
ruff check src tests
snakemake --lint --configfile config/quick.yaml -n > /dev/null
pytest "$@"
