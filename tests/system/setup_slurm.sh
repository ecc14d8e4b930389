#!/usr/bin/env bash
# Install the packages the Slurm system tests need (Debian's slurm-wlm and munge). Idempotent.
# The tests themselves start the cluster (tests/system/slurm_cluster.py); this only installs.
set -euo pipefail
if command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup_slurm: need root and apt-get to install slurm-wlm and munge" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
