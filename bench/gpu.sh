#!/usr/bin/env bash
# One-GPU benchmark of `ds-train pretrain`: ~1B Llama, bf16, seq 2048, ZeRO-2, synthetic local
# shards, no network. Prints tokens/s and MFU (vs 989 TFLOP/s dense bf16) per tuning variant.
#
#   bench/gpu.sh                                   # every variant, then the combined "tuned" run
#   VARIANTS="baseline compile act_ckpt" bench/gpu.sh
#   GPU_BENCH_TOY=1 bench/gpu.sh                   # CPU smoke test: tiny model, seq 128, fp32 (MFU vs 989 too)
#   STEPS=30 WARMUP=5 MICRO=4 GLOBAL_BATCH=64 SEQ_LEN=4096 bench/gpu.sh
#
# Results also go to $OUT/gpu_bench.json (or ./gpu_bench.json) for docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[[ -x $PY ]] || PY=python3

args=()
if [[ ${GPU_BENCH_TOY:-0} == 1 ]]; then
  args+=(--toy)
else
  if ! command -v nvidia-smi >/dev/null || ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench/gpu.sh: no CUDA device visible to $PY (GPU_BENCH_TOY=1 runs the CPU smoke test)" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
fi
[[ -n ${VARIANTS:-} ]] && args+=(--variants $VARIANTS)
[[ -n ${STEPS:-} ]] && args+=(--steps "$STEPS")
[[ -n ${WARMUP:-} ]] && args+=(--warmup "$WARMUP")
[[ -n ${MICRO:-} ]] && args+=(--micro "$MICRO")
[[ -n ${GLOBAL_BATCH:-} ]] && args+=(--global-batch "$GLOBAL_BATCH")
[[ -n ${SEQ_LEN:-} ]] && args+=(--seq-len "$SEQ_LEN")
[[ -n ${WORKDIR:-} ]] && args+=(--workdir "$WORKDIR")

# One thread per rank for the CPU side (the data loader has its own workers); no hub access.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$PY" bench/gpu_bench.py "${args[@]}" --json "${OUT:-.}/gpu_bench.json"
