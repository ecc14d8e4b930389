# One attempt of a training job, shared by pretrain.sbatch and finetune.sbatch (sourced, with
# $command and $py set): prepare → the training step → requeue decision → `scontrol requeue`.
# Arguments: RUN.yaml [section.key=value ...], or DS_TRAIN_CONFIG and DS_TRAIN_OVERRIDES; with
# DS_TRAIN_CONFIG the arguments may be overrides alone, and DS_TRAIN_OVERRIDES come before the
# arguments' (so these win).
if [ -n "${DS_TRAIN_CONFIG:-}" ] && { [ $# -eq 0 ] || [[ "$1" == *=* ]]; }; then
  config=$DS_TRAIN_CONFIG
else
  config=${1:-}
  if [ $# -gt 0 ]; then shift; fi
fi
if [ -n "${DS_TRAIN_OVERRIDES:-}" ]; then eval "set -- $DS_TRAIN_OVERRIDES \"\$@\""; fi
if [ -z "$config" ]; then
  echo "usage: sbatch [options] slurm/$command.sbatch RUN.yaml [section.key=value ...]" >&2
  exit 2
fi

# run_dir, log (this attempt's log file), summary, step_cmd=(srun …), MASTER_ADDR/MASTER_PORT
setup=$("${py[@]}" -m ds_train slurm prepare "$command" "$config" "$@") || exit $?
eval "$setup"
echo "$summary"
echo "ds_train: this attempt logs to $log"
exec >>"$log" 2>&1
echo "$summary"

# The time-limit warning (--signal=USR1@…) goes to the training step itself; `scancel --signal=USR1
# --batch` or `--signal=B:USR1@…` reach only this shell, which passes it on (srun forwards it to
# every task). Without these traps bash would die of USR1/TERM and take the step with it.
# A signal that came before this point (the batch script holds them from its first line) means
# the job is to stop before its step starts: it is treated as a step that checkpointed and stopped.
signal_seen=${signal_seen:-}
trap 'signal_seen=USR1; echo "ds_train: got SIGUSR1: the training step checkpoints and stops"; kill -USR1 "$step_pid" 2>/dev/null' USR1
trap 'signal_seen=TERM; echo "ds_train: got SIGTERM: Slurm is ending the job"' TERM

if [ -n "$signal_seen" ]; then
  echo "ds_train: got SIG$signal_seen before the training step started: not starting it"
  rc=75
else
  "${step_cmd[@]}" &
  step_pid=$!
  while :; do
    wait "$step_pid"
    rc=$?
    # `wait` returns early (status > 128) when a trapped signal arrives while the step goes on.
    if [ "$rc" -le 128 ]; then break; fi
    if kill -0 "$step_pid" 2>/dev/null; then continue; fi
    wait "$step_pid" && rc=0 || { again=$?; [ "$again" = 127 ] || rc=$again; }
    break
  done
  echo "ds_train: training step exited with status $rc"
fi

decision=$("${py[@]}" -m ds_train slurm finish "$run_dir" --exit-code "$rc" ${signal_seen:+--signal "$signal_seen"})
if [ "$decision" = requeue ]; then
  if scontrol requeue "$SLURM_JOB_ID"; then
    echo "ds_train: requeued job $SLURM_JOB_ID; the next attempt resumes from the latest checkpoint"
    exit 0
  fi
  echo "ds_train: scontrol requeue failed (submitted with --no-requeue, or requeue not allowed here)"
fi
exit "$rc"
