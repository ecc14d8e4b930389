#!/usr/bin/env bash
# The `deepspeed` launcher, one node or several through a hostfile (it uses ssh/pdsh between nodes;
# on Slurm prefer slurm/*.sbatch, which needs neither):
#   launch/deepspeed.sh 8 configs/runs/demo-tiny-llama.yaml                 # this node, 8 ranks
#   HOSTFILE=hosts launch/deepspeed.sh 8 configs/runs/demo-tiny-llama.yaml  # "node1 slots=8" per line
set -euo pipefail
nproc=${1:?usage: launch/deepspeed.sh NPROC_PER_NODE CONFIG [section.key=value ...]}
shift
here=$(cd "$(dirname "$0")/.." && pwd)
ds=${DEEPSPEED:-$here/.venv/bin/deepspeed}
args=(--num_gpus "$nproc" --master_port "${MASTER_PORT:-29500}")
if [ -n "${HOSTFILE:-}" ]; then
  args=(--hostfile "$HOSTFILE" --num_gpus "$nproc" --master_port "${MASTER_PORT:-29500}")
fi
exec "$ds" "${args[@]}" --module ds_train "${COMMAND:-pretrain}" "$@"
