#!/usr/bin/env bash
# Tokenize a corpus with a Slurm array of TASKS tasks, then merge, as two dependent jobs:
#   sharding/submit.sh 16 corpus/*.jsonl.zst --output shards/ --tokenizer tok/ --seq-len 2048
# Extra sbatch options go in SBATCH_ARGS (e.g. SBATCH_ARGS="--cpus-per-task=8 --partition=cpu").
# Prints the two job ids. The result is the same as `ds-train shard … --workers K` on one machine.
set -euo pipefail
tasks=${1:?usage: sharding/submit.sh TASKS INPUT… --output DIR --tokenizer DIR --seq-len N [shard options]}
shift
here=$(cd "$(dirname "$0")" && pwd)
output=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --output) output=${args[$((i + 1))]:-} ;;
    --output=*) output=${args[$i]#--output=} ;;
  esac
done
[ -n "$output" ] || { echo "sharding/submit.sh: --output DIR is required" >&2; exit 2; }
read -r -a extra <<< "${SBATCH_ARGS:-}"
array=$(sbatch --parsable "${extra[@]}" --array=0-$((tasks - 1)) "$here/shard_array.sbatch" "$@")
array=${array%%;*}
merge=$(sbatch --parsable "${extra[@]}" --dependency=afterok:"$array" "$here/merge.sbatch" "$output")
echo "tokenize: job $array ($tasks tasks); merge: job ${merge%%;*} (after all tasks succeed)"
