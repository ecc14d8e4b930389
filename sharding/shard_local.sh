#!/usr/bin/env bash
# Shard a corpus on this machine with one worker per core (or WORKERS):
#   sharding/shard_local.sh corpus/*.jsonl --output shards/ --tokenizer tok/ --seq-len 2048
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$here/.venv/bin/python}
exec "$py" -m ds_train shard "$@" --workers "${WORKERS:-$(nproc)}"
