#!/usr/bin/env bash
# The whole GPU check as ONE call of a lent machine (which allows 600 s a call and 15 minutes in
# all, start-up included): the tuning variants within a budget, then the trainer anchors, each part
# under a hard timeout so the call ends inside its limit with whatever finished. Logs and results
# land in $OUT (6 files at most: a lent machine returns 8):
#   gpu_bench.json, gpu_bench.log, gpu_profile/{baseline,candidate,tuned}.pt.trace.json.gz,
#   gpu_trainer_anchors.json, gpu_anchors.log
#
# Here first: bench/gpu_wheels.sh (makes .whl/). Then, with the device tool:
#   run(command="bash bench/gpu_lease.sh", carry=[".whl"], timeout_s=600)
# and, with about 4 minutes of device time left, MODE=save (docs/performance.md, "GPU").
#
#   VARIANT_BUDGET_S=280 ANCHOR_TIMEOUT_S=200 bash bench/gpu_lease.sh   # the defaults
#   GPU_BENCH_TOY=1 VARIANT_BUDGET_S=60 ANCHOR_TIMEOUT_S=120 bash bench/gpu_lease.sh   # CPU smoke test
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-.}
mkdir -p "$out"
variant_budget=${VARIANT_BUDGET_S:-280}
anchor_timeout=${ANCHOR_TIMEOUT_S:-200}
if [[ ${GPU_BENCH_TOY:-0} == 1 ]]; then steps=${STEPS:-12} batch=${GLOBAL_BATCH:-8}; else steps=${STEPS:-15} batch=${GLOBAL_BATCH:-32}; fi
t0=$SECONDS

# Runs go into sessions of their own (so a timed-out one is killed with its ranks); a part killed
# by its backstop timeout could leave one holding the GPU: none may outlive its part.
leftovers() {
  pkill -KILL -f "bench/(ds_train_loop|bare_deepspeed_loop|hf_trainer_loop)\.py" 2>/dev/null || true
}

# 1. Variants: baseline, the likeliest-best candidate, then single knobs, as the budget allows
#    (gpu_bench.py kills a run that outlasts the budget by more than 30 s; this timeout is the
#    backstop). 32 sequences of 2048 tokens a step: ~1 s on an H100 at the MFU goal.
timeout -k 10 $((variant_budget + 60)) env BUDGET_S="$variant_budget" STEPS="$steps" \
  GLOBAL_BATCH="$batch" RUN_TIMEOUT_S="${RUN_TIMEOUT_S:-200}" \
  bash bench/gpu.sh 2>&1 | tee "$out/gpu_bench.log"
echo "gpu_lease: variants ended with ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$out/gpu_bench.log"
leftovers

# 2. Anchors: ds-train vs bare DeepSpeed vs the HF Trainer (and ds-train with full logits), ZeRO-2,
#    once each, every system's run killed past 75 s; results written after each run.
timeout -k 10 "$anchor_timeout" env MODE=anchors STAGES=2 REPEATS=1 STEPS=15 RUN_TIMEOUT_S=75 \
  bash bench/gpu.sh 2>&1 | tee "$out/gpu_anchors.log"
echo "gpu_lease: anchors ended with ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$out/gpu_anchors.log"
leftovers
