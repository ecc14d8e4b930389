"""`ds-train shard` as a Slurm array job: which share a task tokenizes, and the merge job after.

Every task of `sbatch --array=0-N slurm/shard_array.sbatch INPUT… --output DIR …` runs the same
command with `--task-index i --num-tasks n` (i = its position in the array); the array's first
task submits `slurm/shard_array.sbatch` once more, outside an array and depending on the whole
array (`afterok`), which writes the shards and manifests (`ds-train shard --merge`). The output is
byte-for-byte the one a single `ds-train shard` writes (the sharder's two-phase design).

To redo some tasks of an n-task array, submit just those ids with DS_TRAIN_SHARD_NUM_TASKS=n:
the index is then the array id itself (tasks skip pieces already tokenized).
"""

from __future__ import annotations

import argparse
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

MERGE_MARKER = "merge-job"  # in the sharder's work directory: the id of the merge job submitted


@dataclass(frozen=True)
class ArrayTask:
    array_job_id: str
    index: int
    count: int
    is_first: bool

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ArrayTask | None:
        """This task's place in the array, or None outside an array job (the merge)."""
        if "SLURM_ARRAY_TASK_ID" not in env:
            return None
        task_id = int(env["SLURM_ARRAY_TASK_ID"])
        lo = int(env.get("SLURM_ARRAY_TASK_MIN", task_id))
        hi = int(env.get("SLURM_ARRAY_TASK_MAX", task_id))
        step = int(env.get("SLURM_ARRAY_TASK_STEP") or 1)
        count = int(env.get("SLURM_ARRAY_TASK_COUNT") or 1)
        job = env.get("SLURM_ARRAY_JOB_ID", env.get("SLURM_JOB_ID", "0"))
        fixed = env.get("DS_TRAIN_SHARD_NUM_TASKS")
        if fixed:
            n = int(fixed)
            if not 0 <= task_id < n:
                raise ValueError(f"array task {task_id} is outside 0..{n - 1} (DS_TRAIN_SHARD_NUM_TASKS={n})")
            return cls(job, task_id, n, is_first=False)  # a partial rerun: the merge is the user's call
        if (hi - lo) // step + 1 != count or (task_id - lo) % step:
            raise ValueError(
                f"the array ids must be one range (e.g. --array=0-{count - 1}), got min {lo}, max {hi}, "
                f"step {step}, {count} tasks; to rerun some tasks set DS_TRAIN_SHARD_NUM_TASKS"
            )
        return cls(job, (task_id - lo) // step, count, is_first=task_id == lo)


def _parse(shard_args: Sequence[str]) -> argparse.Namespace:
    from ds_train.cli import shard as shard_cli

    parser = argparse.ArgumentParser(prog="ds-train", exit_on_error=False)
    shard_cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["shard", *shard_args])


def task_argv(shard_args: Sequence[str], task: ArrayTask, env: Mapping[str, str]) -> list[str]:
    """`ds-train shard` arguments for one array task."""
    args = _parse(shard_args)
    if args.merge or args.task_index is not None or args.num_tasks is not None:
        raise ValueError("shard_array.sbatch sets --task-index/--num-tasks/--merge itself; leave them out")
    argv = ["shard", *shard_args, "--task-index", str(task.index), "--num-tasks", str(task.count)]
    return argv + _default_workers(shard_args, env)


def merge_argv(shard_args: Sequence[str], env: Mapping[str, str] | None = None) -> list[str]:
    """`ds-train shard --merge` arguments from the array's own arguments (their --output etc.)."""
    args = _parse(shard_args)
    argv = ["shard", "--merge", "--output", args.output]
    if "--workers" in shard_args or any(a.startswith("--workers=") for a in shard_args):
        argv += ["--workers", str(args.workers)]
    else:
        argv += _default_workers(shard_args, env or os.environ)
    if args.keep_work:
        argv.append("--keep-work")
    if args.no_progress:
        argv.append("--no-progress")
    return argv


def _default_workers(shard_args: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """Without --workers, one worker per CPU Slurm gave the task."""
    if "--workers" in shard_args or any(a.startswith("--workers=") for a in shard_args):
        return []
    cpus = env.get("SLURM_CPUS_PER_TASK", "")
    return ["--workers", cpus] if cpus.isdigit() and int(cpus) > 1 else []


def submit_merge_once(shard_args: Sequence[str], task: ArrayTask, env: Mapping[str, str]) -> str | None:
    """Submit the merge job unless one for this output is already queued; returns its id or None."""
    from ds_train.data.sharding import work_dir
    from ds_train.distributed.requeue import job_alive
    from ds_train.distributed.slurm_launch import split_words

    args = _parse(shard_args)
    marker = work_dir(args.output) / MERGE_MARKER
    if marker.is_file() and job_alive(marker.read_text().strip()):
        return None
    script = env.get("DS_TRAIN_SBATCH_SCRIPT")
    if not script:
        raise ValueError("DS_TRAIN_SBATCH_SCRIPT is unset: run this through slurm/shard_array.sbatch")
    cmd = [
        "sbatch",
        "--parsable",
        f"--dependency=afterok:{task.array_job_id}",
        "--kill-on-invalid-dep=yes",
        f"--job-name={env.get('SLURM_JOB_NAME', 'ds-shard')}-merge",
        "--output=slurm-%x-%j.out",
    ]
    for option, var in (("partition", "SLURM_JOB_PARTITION"), ("account", "SLURM_JOB_ACCOUNT")):
        if env.get(var):
            cmd.append(f"--{option}={env[var]}")
    if env.get("SLURM_CPUS_PER_TASK"):
        cmd.append(f"--cpus-per-task={env['SLURM_CPUS_PER_TASK']}")
    cmd += split_words(env.get("DS_TRAIN_SHARD_MERGE_ARGS"))
    cmd += [script, *shard_args]
    # The merge job must not inherit this task's array identity (sbatch exports the environment):
    # the job's own SLURM_* go, and an --array given as SBATCH_ARRAY_INX. The user's other SBATCH_*
    # defaults (QoS, time limit, reservation, constraint, ...) stay: sites may require them.
    child_env = {
        k: v
        for k, v in env.items()
        if not k.startswith(("SLURM_ARRAY_", "SLURM_JOB_")) and k != "SBATCH_ARRAY_INX"
    }
    out = subprocess.run(cmd, capture_output=True, text=True, env=child_env, timeout=120)
    if out.returncode != 0:
        raise ValueError(f"submitting the merge job failed: {out.stderr.strip()}")
    job_id = out.stdout.strip().split(";")[0]
    marker.parent.mkdir(parents=True, exist_ok=True)
    Path(marker).write_text(job_id + "\n")
    return job_id
