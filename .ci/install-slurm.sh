#!/usr/bin/env bash
# Installs Debian's SLURM, munge, slurmdbd and MariaDB for the SLURM tests (tests/test_slurm.py,
# which start a private single-node cluster with tests/slurm/cluster.sh). Needs root.
#
# Run it after the default test suite, right before the SLURM tests: once `scontrol` is
# installed, the Snakemake SLURM plugin runs `scontrol show config` whenever Snakemake
# starts (local runs too), which takes about 10 s whenever a slurm.conf names a controller
# that is not running. cluster.sh writes no /etc/slurm/slurm.conf, so with no cluster up
# scontrol fails at once, but keeping the packages away from the default suite removes the
# question entirely.
set -euo pipefail

packages=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

if [[ "$(id -u)" -ne 0 ]]; then
  echo "install-slurm.sh: error: must run as root (apt-get install)" >&2
  exit 1
fi

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
  echo "install-slurm.sh: ${packages[*]} already installed"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
# The package installs must not start daemons (there is no init system in CI containers,
# and the tests start their own private ones): policy-rc.d exit 101 forbids it.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e "$policy" ]]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod 0755 "$policy"
  created_policy=1
fi
cleanup() {
  if ((created_policy)); then rm -f "$policy"; fi
}
trap cleanup EXIT

echo "install-slurm.sh: installing ${missing[*]}"
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
slurmd -V
