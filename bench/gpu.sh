#!/usr/bin/env bash
# One-GPU benchmark of `ds-train pretrain`: ~1B Llama, bf16, seq 2048, ZeRO-2, synthetic local
# shards, no network. Prints tokens/s and MFU (vs 989 TFLOP/s dense bf16) per tuning variant.
#
#   bench/gpu.sh                                   # every variant, then the combined "tuned" run
#   VARIANTS="baseline compile act_ckpt" bench/gpu.sh
#   GPU_BENCH_TOY=1 bench/gpu.sh                   # CPU smoke test: tiny model, seq 128, fp32 (MFU vs 989 too)
#   STEPS=30 WARMUP=5 MICRO=4 GLOBAL_BATCH=64 SEQ_LEN=4096 bench/gpu.sh
#   MODE=anchors bench/gpu.sh                      # ds-train vs bare DeepSpeed vs the HF Trainer on this GPU
#   MODE=anchors STAGES=2 REPEATS=1 RUN_TIMEOUT_S=75 bench/gpu.sh   # the lease's share of it
#   MODE=save bench/gpu.sh                         # background checkpoints checked and timed on this GPU
#   GPU_BENCH_TOY=1 MODE=anchors bench/gpu.sh      # the same at toy size on CPU
#   BUDGET_S=300 bench/gpu.sh                      # the variants that fit in 300 s, likeliest first
#
# On a lent machine with a stock CUDA + PyTorch image and no package index: run bench/gpu_wheels.sh
# here, carry .whl/, and this script installs them first. One 15-minute lease: bench/gpu_lease.sh,
# one call (docs/performance.md, "GPU").
#
# MODE=anchors runs bench/bench_trainer.py on one GPU: a ~430 M Llama (hidden 2048, 8 layers,
# the repo's 4k vocabulary), bf16, seq 2048, micro 4 × accumulation 4, synthetic shards, ZeRO-0 and
# ZeRO-2, each system REPEATS times (default 2, ≈ 8 min) in rotated order: the issue's trainer
# goals (≥ 0.98× bare DeepSpeed, ≥ 1.05× the Trainer) measured where the CPU VM's noise is absent.
#
# MODE=save (a second call, if the lease has ~4 minutes left): background checkpoints on the GPU
# (bench/bench_async_save.py --check): their contents and the state they load equal a foreground
# save's, through host memory kept between saves, then the blocking time of a
# foreground save, a background one into kept memory and one into new memory (~450 M Llama, bf16).
#
# Results also go to $OUT/gpu_bench.json (or ./gpu_bench.json) for docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[[ -x $PY ]] || PY=python3

# A machine with no package index and no install of this repo (a lent GPU box with a stock CUDA +
# PyTorch image): the repo goes on the path, and the wheels bench/gpu_wheels.sh made, carried
# as .whl/, go into a private directory ahead of the image's packages.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
site=${GPU_BENCH_SITE:-/tmp/ds_train_site}
# installed by an earlier invocation on this machine (bench/gpu_lease.sh calls this script twice)
[[ -d $site/deepspeed ]] && export PYTHONPATH=$site:$PYTHONPATH
if ! "$PY" -c 'import deepspeed, webdataset' >/dev/null 2>&1; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "bench/gpu.sh: $PY cannot import deepspeed and webdataset, and there is no .whl/ to install" \
      "them from (bench/gpu_wheels.sh makes it on a machine with a package index)" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH=$site:$PYTHONPATH
  "$PY" -c 'import deepspeed, webdataset, ds_train' >/dev/null
fi

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
[[ -n ${BUDGET_S:-} ]] && args+=(--budget-s "$BUDGET_S")
[[ -n ${RUN_TIMEOUT_S:-} ]] && args+=(--run-timeout-s "$RUN_TIMEOUT_S")

# One thread per rank for the CPU side (the data loader has its own workers); no hub access.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [[ ${MODE:-variants} == save ]]; then
  if [[ ${GPU_BENCH_TOY:-0} == 1 ]]; then
    size=(--precision fp32 --hidden 256 --layers 2 --seq 128 --steps 2)
  else
    size=(--precision bf16 --hidden 2048 --layers 8 --seq "${SEQ_LEN:-2048}" --steps "${STEPS:-10}")
  fi
  exec "$PY" bench/bench_async_save.py --check --nproc 1 --stages 2 --repeats "${REPEATS:-4}" "${size[@]}" \
    --json "${OUT:-.}/gpu_async_save.json"
fi
if [[ ${MODE:-variants} == anchors ]]; then
  if [[ ${GPU_BENCH_TOY:-0} == 1 ]]; then
    size=(--precision fp32 --hidden 256 --layers 2 --synthetic-seq-len 128 --workers 0 --steps 10 --warmup 5)
  else
    size=(--precision bf16 --hidden 2048 --layers 8 --synthetic-seq-len "${SEQ_LEN:-2048}" --workers 2
          --steps "${STEPS:-30}" --warmup "${WARMUP:-5}")
  fi
  timeout=()
  [[ -n ${RUN_TIMEOUT_S:-} ]] && timeout=(--run-timeout-s "$RUN_TIMEOUT_S")
  # shellcheck disable=SC2086  # STAGES is a list of numbers
  exec "$PY" bench/bench_trainer.py --nproc 1 --stages ${STAGES:-0 2} --repeats "${REPEATS:-2}" "${size[@]}" \
    --global-batch 16 --micro-batch 4 --full-logits "${timeout[@]}" --json "${OUT:-.}/gpu_trainer_anchors.json"
fi
exec "$PY" bench/gpu_bench.py "${args[@]}" --json "${OUT:-.}/gpu_bench.json" --profile-dir "${OUT:-.}/gpu_profile"
