#!/usr/bin/env bash
# accelerate launch, on one machine or (run once per machine) on several:
#   launch/accelerate.sh configs/runs/demo-tiny-llama.yaml                         # one machine, GPUS_PER_NODE ranks
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/accelerate.sh RUN.yaml ...    # on the first machine
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/accelerate.sh RUN.yaml ...    # on the second
# GPUS_PER_NODE defaults to the visible GPUs (2 CPU ranks without a GPU). ZeRO settings come from the run config.
set -euo pipefail
config=${1:?usage: launch/accelerate.sh RUN_CONFIG [section.key=value ...]}
shift
here=$(cd "$(dirname "$0")/.." && pwd)
acc=${ACCELERATE:-$here/.venv/bin/accelerate}
# `|| true`: with pipefail, a machine without nvidia-smi would end the script here (exit 127)
gpus=${GPUS_PER_NODE:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
[ "$gpus" -gt 0 ] || gpus=2
nnodes=${NNODES:-1}
if [ "$nnodes" -gt 1 ]; then
  exec "$acc" launch --config_file "$here/configs/accelerate/multi_node.yaml" \
    --num_machines "$nnodes" --num_processes $((nnodes * gpus)) --machine_rank "${NODE_RANK:?set NODE_RANK}" \
    --main_process_ip "${MASTER_ADDR:?set MASTER_ADDR}" --main_process_port "${MASTER_PORT:-29500}" \
    -m ds_train "${COMMAND:-pretrain}" "$config" "$@"
fi
exec "$acc" launch --config_file "$here/configs/accelerate/single_node.yaml" --num_processes "$gpus" \
  -m ds_train "${COMMAND:-pretrain}" "$config" "$@"
