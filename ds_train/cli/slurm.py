"""`ds-train slurm …`: what the batch scripts in slurm/ ask ds_train, so they stay thin bash.

- `prepare COMMAND RUN.yaml [overrides]` (batch script, before the training step): the run
  directory, this attempt's log file and the `srun …` line, as bash assignments for `eval`;
  records the attempt's start in <run_dir>/logs/slurm-attempts.jsonl.
- `finish RUN_DIR --exit-code N [--signal USR1|TERM]` (after the step): prints `requeue` or
  `stop` and records why (see distributed/requeue.py).
- `node-launch torchrun|accelerate --nproc-per-node G -- COMMAND …` (inside one srun task per
  node): starts the per-node launcher with this node's rank.
- `shard SHARD_ARGS…` (shard_array.sbatch): one array task's share of `ds-train shard`, or, outside
  an array, the merge; the array's first task submits the merge as a job depending on the array.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("slurm", help="helpers for the Slurm batch scripts in slurm/ (see slurm/README.md)")
    ssub = p.add_subparsers(dest="action", required=True)

    pr = ssub.add_parser("prepare", help="run dir, log file and srun line of a training attempt (bash)")
    pr.add_argument("train_command", choices=["pretrain", "finetune"])
    pr.add_argument("config", help="run config YAML")
    pr.add_argument("overrides", nargs="*", help="dotted overrides")
    pr.add_argument(
        "--launcher",
        default=os.environ.get("DS_TRAIN_LAUNCHER", "srun"),
        help="srun (one task per GPU, default) | torchrun | accelerate (one task per node); env DS_TRAIN_LAUNCHER",
    )
    pr.set_defaults(func=prepare)

    fi = ssub.add_parser("finish", help="record an attempt's end; print requeue or stop")
    fi.add_argument("run_dir")
    fi.add_argument("--exit-code", type=int, required=True, help="the training step's exit status")
    fi.add_argument("--signal", choices=["USR1", "TERM"], default=None, help="a signal the batch shell got")
    fi.add_argument(
        "--max-failures",
        type=int,
        default=None,
        help="attempts in a row without a new checkpoint before giving up (env DS_TRAIN_MAX_FAILURES, default 3)",
    )
    fi.set_defaults(func=finish)

    nl = ssub.add_parser("node-launch", help="start torchrun / accelerate launch for this node (in srun)")
    nl.add_argument("style", choices=["torchrun", "accelerate"])
    nl.add_argument("--nproc-per-node", type=int, required=True)
    nl.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND RUN.yaml [overrides]")
    nl.set_defaults(func=node_launch)

    sh = ssub.add_parser("shard", help="one Slurm array task of `ds-train shard`, or the merge")
    sh.add_argument("shard_args", nargs=argparse.REMAINDER, help="the arguments of `ds-train shard`")
    sh.set_defaults(func=shard)


# --- training attempts ----------------------------------------------------------------------------


def prepare(args: argparse.Namespace) -> int:
    from ds_train.config import ConfigError, load_config
    from ds_train.config.loader import repo_configs_dir
    from ds_train.distributed.requeue import USER_ERROR_FILE_ENV, AttemptLog, job_alive, max_failures_from_env
    from ds_train.distributed.slurm_launch import (
        Allocation,
        SlurmLaunchError,
        shell_assignments,
        split_words,
        step_command,
    )

    cfg = load_config(args.config, args.overrides)
    max_failures_from_env()  # a bad DS_TRAIN_MAX_FAILURES fails here, not at the requeue decision
    try:
        alloc = Allocation.from_env(os.environ)
        python = split_words(os.environ.get("DS_TRAIN_TASK_PYTHON")) or split_words(
            os.environ.get("DS_TRAIN_PYTHON")
        )
        cpus = os.environ.get("DS_TRAIN_CPUS_PER_TASK")
        command = [args.train_command, str(Path(args.config).absolute()), *args.overrides]
        srun = step_command(
            args.launcher,
            command,
            alloc,
            python=python or [sys.executable],
            cpus_per_task=int(cpus) if cpus else None,
            extra_srun_args=split_words(os.environ.get("DS_TRAIN_SRUN_ARGS")),
        )
    except (SlurmLaunchError, ValueError) as e:
        raise ConfigError(str(e)) from None
    attempts = AttemptLog(cfg.run.output_dir)
    other = attempts.running_job()
    if other not in (None, alloc.job_id) and job_alive(other):
        raise ConfigError(
            f"{cfg.run.output_dir} is in use by Slurm job {other}, which is still queued or running; "
            "two jobs on one run directory would overwrite each other's checkpoints"
        )
    record = attempts.start(
        alloc.job_id,
        alloc.restart,
        command=args.train_command,
        launcher=args.launcher,
        nodes=list(alloc.nodes),
        ranks_per_node=alloc.ranks_per_node,
    )
    step = record["step"]
    summary = (
        f"ds_train: job {alloc.job_id} attempt r{alloc.restart}: {args.train_command} on {len(alloc.nodes)} node(s) "
        f"× {alloc.ranks_per_node} rank(s), launcher {args.launcher}, rendezvous "
        f"{alloc.master_addr}:{alloc.master_port}; "
        + (
            f"resumes from step {step}"
            if step is not None
            else f"no checkpoint of its own yet: branches off {cfg.run.start_from}"
            if cfg.run.start_from
            else "no checkpoint yet: starts from step 0"
        )
    )
    sys.stdout.write(
        shell_assignments(
            {
                "run_dir": cfg.run.output_dir,
                "log": str(attempts.log_file(alloc.job_id, alloc.restart)),
                "summary": summary,
                "step_cmd": srun,
                "MASTER_ADDR": alloc.master_addr,
                "MASTER_PORT": str(alloc.master_port),
                # a rank's exit 2 (config or data error) is written here: per-node launchers report 1
                USER_ERROR_FILE_ENV: str(attempts.user_error_file(alloc.job_id, alloc.restart)),
                # the per-node launchers read the accelerate config from here
                "DS_TRAIN_ACCELERATE_CONFIG": str(repo_configs_dir() / "accelerate" / "multi_node.yaml"),
            }
        )
        + f"export MASTER_ADDR MASTER_PORT DS_TRAIN_ACCELERATE_CONFIG {USER_ERROR_FILE_ENV}\n"
    )
    return 0


def finish(args: argparse.Namespace) -> int:
    from ds_train.distributed.requeue import AttemptLog, max_failures_from_env

    job_id = os.environ.get("SLURM_JOB_ID", "0")
    restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    max_failures = args.max_failures if args.max_failures is not None else max_failures_from_env()
    decision = AttemptLog(args.run_dir).finish(
        job_id, restart, exit_code=args.exit_code, signal=args.signal, max_failures=max_failures
    )
    verdict = "requeue" if decision.requeue else "stop"
    print(f"ds_train: job {job_id} attempt r{restart}: {verdict}: {decision.reason}", file=sys.stderr)
    print(verdict)
    return 0


def node_launch(args: argparse.Namespace) -> int:
    from ds_train.config import ConfigError
    from ds_train.config.loader import repo_configs_dir
    from ds_train.distributed.slurm_launch import SlurmLaunchError, node_command

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise ConfigError("node-launch: give the ds_train command after --, e.g. -- pretrain RUN.yaml")
    try:
        argv = node_command(
            args.style,
            args.nproc_per_node,
            command,
            os.environ,
            python=sys.executable,
            accelerate_config=os.environ.get("DS_TRAIN_ACCELERATE_CONFIG")
            or str(repo_configs_dir() / "accelerate" / "multi_node.yaml"),
        )
    except SlurmLaunchError as e:
        raise ConfigError(str(e)) from None
    # Slurm signals every process of the step, the workers included. torchrun would die of the
    # SIGUSR1 (or, told to handle it, shut its workers down after a timeout and exit), taking the
    # checkpoint in progress with it; ignored here, it keeps waiting while the workers, which
    # install their own handler, checkpoint and exit.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(argv[0], argv)
    return 0  # not reached


# --- sharding as an array job ---------------------------------------------------------------------


def shard(args: argparse.Namespace) -> int:
    from ds_train.cli import main as cli_main
    from ds_train.config import ConfigError
    from ds_train.distributed.slurm_array import ArrayTask, merge_argv, submit_merge_once, task_argv

    shard_args = args.shard_args[1:] if args.shard_args[:1] == ["--"] else list(args.shard_args)
    try:
        task = ArrayTask.from_env(os.environ)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if task is None:
        return cli_main(merge_argv(shard_args))
    if task.is_first and os.environ.get("DS_TRAIN_SHARD_MERGE", "1") != "0":
        job = submit_merge_once(shard_args, task, os.environ)
        if job is not None:
            print(f"ds_train: submitted the merge as job {job} (runs when every array task succeeded)")
    return cli_main(task_argv(shard_args, task, os.environ))
