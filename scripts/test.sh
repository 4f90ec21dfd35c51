#!/usr/bin/env bash
# The test command: lint, workflow lint, the test suite, then the SLURM tests.
# The SLURM tests need Debian's slurm packages (`.ci/install-slurm.sh`, as root); without
# them they are skipped, unless VITPLASTICITY_REQUIRE_SLURM=1 makes that a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" MPLBACKEND=Agg DVC_NO_ANALYTICS=1
ruff check src tests benchmarks
snakemake --lint --configfile config/quick.yaml > /dev/null
snakefmt --check Snakefile workflow/rules
# Everything but SLURM first: with SLURM's client installed and no controller up, every
# snakemake start would wait on `scontrol`.
pytest -m "not slurm" --durations=25 "$@"
if [ "${VITPLASTICITY_INSTALL_SLURM:-0}" = 1 ]; then
    bash .ci/install-slurm.sh
fi
pytest -m slurm "$@"
