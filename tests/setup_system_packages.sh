#!/usr/bin/env bash
# Install the system packages some tests need, those missing only. Idempotent.
#   slurm-wlm, munge  the local two-node Slurm cluster of the system tests (tests/system/slurm_cluster.py
#                     starts it; this only installs)
#   libaio-dev        DeepSpeed's async_io op, which NVMe offload compiles on first use
#                     (tests/distributed/test_offload.py)
set -euo pipefail
want=()
if ! { command -v slurmctld && command -v slurmd && command -v munged; } >/dev/null 2>&1; then
  want+=(slurm-wlm munge)
fi
if [ ! -f /usr/include/libaio.h ]; then
  want+=(libaio-dev)
fi
[ ${#want[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup_system_packages: need root and apt-get to install ${want[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
