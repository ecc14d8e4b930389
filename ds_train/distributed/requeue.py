"""Should a Slurm training job requeue itself after its training step ended? And the record of
every attempt, in the run directory, that answers it.

The batch script (slurm/train_job.sh) runs the training as one job step, then asks `decide`:

- exit 0: the run finished. Never requeue.
- exit 2: a user error (bad config or data, printed as one line). Requeueing cannot fix it.
- exit 130: checkpointed and stopped on Ctrl-C (SIGINT, e.g. an interactive srun): its user
  stopped it. (torchrun/accelerate report it as 1, like any worker status.)
- the batch shell itself got SIGTERM: Slurm is ending the job (scancel, the time limit without a
  warning signal, preemption in CANCEL/REQUEUE mode). `scontrol requeue` would fight that.
- anything else (75 = checkpointed on SIGUSR1/SIGTERM, or a crash): requeue, unless the run has
  stopped making progress. Progress means a newer complete checkpoint than when the attempt began;
  `max_failures` attempts in a row of the same job without one end the requeueing. A preemption
  without progress counts too: a time limit shorter than start-up plus the grace period would
  otherwise requeue forever.

Progress is judged from checkpoints, not exit codes, because a per-node launcher (torchrun,
accelerate) turns the workers' 75 into its own status 1. It turns their 2 into 1 as well, so a rank
that exits 2 also writes its message to the attempt's user-error file (`record_user_error`, the
file named by DS_TRAIN_USER_ERROR_FILE, which `slurm prepare` sets for the step); an attempt that
left one ends as exit 2, whatever the launcher reported.

The attempts file is JSON lines, one `start` and one `end` record per attempt, so an operator can
read the history of a run (job ids, restarts, steps reached, exit codes, decisions) in one place.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ds_train.checkpoint.layout import checkpoints_dir, latest_checkpoint

LOGS_DIR = "logs"
ATTEMPTS_FILE = "slurm-attempts.jsonl"
PREEMPTED_EXIT_CODE = 75  # the trainer's EX_TEMPFAIL (train/trainer.py); no torch import here
INTERRUPTED_EXIT_CODE = 130  # the trainer's status after a checkpoint on Ctrl-C
USER_ERROR_EXIT_CODE = 2  # ConfigError / DataError, printed by the CLI as one line
DEFAULT_MAX_FAILURES = 3
USER_ERROR_FILE_ENV = "DS_TRAIN_USER_ERROR_FILE"


def record_user_error(message: str, environ: dict | None = None) -> None:
    """Append a rank's one-line config or data error to the attempt's user-error file, if the step
    has one (see the module docstring); never fails the exit it reports."""
    path = (os.environ if environ is None else environ).get(USER_ERROR_FILE_ENV)
    if not path:
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(message.replace("\n", " ") + "\n")
    except OSError:
        pass


@dataclass(frozen=True)
class Decision:
    requeue: bool
    reason: str
    failures: int  # attempts in a row of this job without a new checkpoint, this one included


def decide(
    *,
    exit_code: int,
    signal: str | None,
    start_step: int | None,
    end_step: int | None,
    failures_before: int,
    max_failures: int,
) -> Decision:
    """The requeue decision for one finished attempt (see the module docstring)."""
    progressed = end_step is not None and (start_step is None or end_step > start_step)
    failures = 0 if progressed else failures_before + 1
    reached = f"step {end_step}" if end_step is not None else "no checkpoint"
    if exit_code == 0:
        return Decision(False, f"finished ({reached})", failures)
    if exit_code == USER_ERROR_EXIT_CODE:
        return Decision(False, "exit 2: a config or data error; fix it and resubmit", failures)
    if exit_code == INTERRUPTED_EXIT_CODE:
        return Decision(False, f"interrupted by its user (Ctrl-C); latest checkpoint: {reached}", failures)
    if signal == "TERM":
        return Decision(
            False,
            f"the batch script got SIGTERM: Slurm is ending the job (cancel, time limit or preemption); "
            f"latest checkpoint: {reached}",
            failures,
        )
    what = "checkpointed and stopped on a signal" if exit_code == PREEMPTED_EXIT_CODE else f"exit {exit_code}"
    if progressed:
        return Decision(True, f"{what}; progress to {reached}", failures)
    if failures >= max_failures:
        return Decision(
            False,
            f"{what}; {failures} attempt(s) in a row without a new checkpoint (latest: {reached}); "
            f"giving up (DS_TRAIN_MAX_FAILURES={max_failures})",
            failures,
        )
    return Decision(True, f"{what}; no new checkpoint (failure {failures} of {max_failures})", failures)


def max_failures_from_env(environ: dict | None = None) -> int:
    env = os.environ if environ is None else environ
    value = env.get("DS_TRAIN_MAX_FAILURES", "")
    if not value:
        return DEFAULT_MAX_FAILURES
    if not value.isdigit() or int(value) < 1:
        from ds_train.config.loader import ConfigError

        raise ConfigError(f"DS_TRAIN_MAX_FAILURES must be a positive integer, got {value!r}")
    return int(value)


def checkpoint_step(run_dir: str | os.PathLike) -> int | None:
    ref = latest_checkpoint(checkpoints_dir(run_dir))
    return ref.step if ref is not None else None


def job_alive(job_id: str) -> bool:
    """Whether Slurm still has `job_id` queued or running (False when squeue cannot tell)."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    alive = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD"}
    return out.returncode == 0 and any(s in alive for s in out.stdout.split())


class AttemptLog:
    """<run_dir>/logs/slurm-attempts.jsonl and the per-attempt log file names beside it."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / LOGS_DIR
        self.path = self.dir / ATTEMPTS_FILE

    def log_file(self, job_id: str, restart: int) -> Path:
        """One log per job and per requeue: slurm-<job id>-r<restart count>.log."""
        return self.dir / f"slurm-{job_id}-r{restart}.log"

    def user_error_file(self, job_id: str, restart: int) -> Path:
        """Where the attempt's ranks record an exit-2 error (`record_user_error`)."""
        return self.dir / f"slurm-{job_id}-r{restart}.user-error"

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write must not block the next attempt
        return out

    def start(self, job_id: str, restart: int, **extra) -> dict:
        record = {
            "event": "start",
            "job_id": str(job_id),
            "restart": restart,
            "step": checkpoint_step(self.run_dir),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **extra,
        }
        self._append(record)
        return record

    def running_job(self) -> str | None:
        """The job id of the newest attempt that has a start and no end, or whose end requeued it
        (it is pending again; the caller asks Slurm whether it still is). None if all ended."""
        open_job = None
        for r in self.records():
            if r.get("event") == "start":
                open_job = r.get("job_id")
            elif r.get("event") == "end" and r.get("job_id") == open_job and not r.get("requeue"):
                open_job = None
        return open_job

    def finish(
        self, job_id: str, restart: int, *, exit_code: int, signal: str | None, max_failures: int
    ) -> Decision:
        records = self.records()
        job_id = str(job_id)
        starts = [r for r in records if r.get("event") == "start" and r.get("job_id") == job_id]
        this_start = next((r for r in reversed(starts) if r.get("restart") == restart), None)
        ends = [r for r in records if r.get("event") == "end" and r.get("job_id") == job_id]
        # A resubmitted job starts with a clean slate: the user may have fixed what crashed.
        failures_before = int(ends[-1].get("failures", 0)) if ends else 0
        start_step = this_start.get("step") if this_start else None
        end_step = checkpoint_step(self.run_dir)
        launcher_exit_code = exit_code
        if exit_code != 0 and self.user_error_file(job_id, restart).is_file():
            exit_code = USER_ERROR_EXIT_CODE  # a rank's 2, reported as 1 by torchrun / accelerate
        decision = decide(
            exit_code=exit_code,
            signal=signal,
            start_step=start_step,
            end_step=end_step,
            failures_before=failures_before,
            max_failures=max_failures,
        )
        self._append(
            {
                "event": "end",
                "job_id": job_id,
                "restart": restart,
                "start_step": start_step,
                "step": end_step,
                "exit_code": exit_code,
                **({"launcher_exit_code": launcher_exit_code} if launcher_exit_code != exit_code else {}),
                "signal": signal,
                "failures": decision.failures,
                "requeue": decision.requeue,
                "reason": decision.reason,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
        )
        return decision

    def _append(self, record: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
