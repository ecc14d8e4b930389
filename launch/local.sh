#!/usr/bin/env bash
# N local processes (one per GPU, or CPU ranks on a GPU-less machine) with torchrun:
#   launch/local.sh 8 configs/runs/demo-tiny-llama.yaml train.max_steps=100
# The command after the process count is `ds-train pretrain`'s (use COMMAND=finetune for fine-tuning).
set -euo pipefail
nproc=${1:?usage: launch/local.sh NPROC CONFIG [section.key=value ...]}
shift
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$here/.venv/bin/python}
exec "$py" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m ds_train "${COMMAND:-pretrain}" "$@"
