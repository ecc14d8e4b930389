"""The command lines a Slurm batch script runs to train on its allocation, in two styles.

- `srun` (default): one task per GPU. Every task runs `python -m ds_train COMMAND …` and
  `launch_env.detect` reads its rank from SLURM_PROCID. One process per rank under Slurm's
  control: Slurm's signals reach every rank directly, exit codes pass through, no extra daemon.
- `torchrun` / `accelerate`: one task per node (`srun --ntasks-per-node=1`), each running
  `ds-train slurm node-launch`, which starts torchrun (or `accelerate launch`) with
  `--node_rank/--machine_rank $SLURM_NODEID` read *inside* the task, where it differs per node.
  For sites whose images or habits expect a per-node launcher, or programs that need its
  environment (TORCHELASTIC_*, accelerate's).

Both styles rendezvous at the first node of the allocation on a port derived from the job id and
the requeue count, so the tasks agree without talking and a requeued attempt does not meet the
previous attempt's sockets lingering on the same port. Nothing uses ssh or pdsh.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ds_train.distributed.launch_env import PORT_BASE, PORT_SPAN, expand_hostlist, port_for_job

STYLES = ("srun", "torchrun", "accelerate")


class SlurmLaunchError(ValueError):
    """A launch setting that cannot work (raised as ConfigError by the CLI)."""


@dataclass(frozen=True)
class Allocation:
    """What the batch script's environment says about the job's allocation."""

    job_id: str
    restart: int
    nodes: tuple[str, ...]
    ranks_per_node: int
    cpus_per_node: int | None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Allocation:
        if "SLURM_JOB_ID" not in env:
            raise SlurmLaunchError("not inside a Slurm job (SLURM_JOB_ID is unset): submit with sbatch")
        nodes = tuple(expand_hostlist(env.get("SLURM_JOB_NODELIST", "")))
        if not nodes:
            raise SlurmLaunchError("SLURM_JOB_NODELIST is empty")
        cpus = env.get("SLURM_CPUS_ON_NODE", "")
        return cls(
            job_id=env["SLURM_JOB_ID"],
            restart=int(env.get("SLURM_RESTART_COUNT") or 0),
            nodes=nodes,
            ranks_per_node=ranks_per_node(env),
            cpus_per_node=int(cpus) if cpus.isdigit() else None,
        )

    @property
    def master_addr(self) -> str:
        return self.nodes[0]

    @property
    def master_port(self) -> int:
        return rendezvous_port(self.job_id, self.restart)

    @property
    def world_size(self) -> int:
        return len(self.nodes) * self.ranks_per_node


def ranks_per_node(env: Mapping[str, str]) -> int:
    """Training processes per node: DS_TRAIN_GPUS_PER_NODE, else the GPUs Slurm allocated per node
    (--gpus-per-node, which may name a type: `a100:8`), else --ntasks-per-node, else the tasks
    Slurm placed on each node (`-n N` alone; refused when uneven), else 1."""
    for key in (
        "DS_TRAIN_GPUS_PER_NODE",
        "SLURM_GPUS_PER_NODE",
        "SLURM_GPUS_ON_NODE",
        "SLURM_NTASKS_PER_NODE",
    ):
        value = env.get(key, "")
        m = re.search(r"(\d+)(?:\(x\d+\))?$", value.strip())
        if value and m and int(m.group(1)) > 0:
            return int(m.group(1))
        if key == "DS_TRAIN_GPUS_PER_NODE" and value:
            raise SlurmLaunchError(f"DS_TRAIN_GPUS_PER_NODE must be a positive integer, got {value!r}")
    # `sbatch -n N` without --ntasks-per-node: only SLURM_TASKS_PER_NODE says, e.g. "2(x3)" or "3,1"
    tasks = env.get("SLURM_TASKS_PER_NODE", "")
    counts = {int(m.group(1)) for m in re.finditer(r"(\d+)(?:\(x\d+\))?", tasks)}
    if len(counts) > 1:
        raise SlurmLaunchError(
            f"Slurm placed a different number of tasks on each node (SLURM_TASKS_PER_NODE={tasks}); "
            "ds_train runs as many ranks on every node: give sbatch --ntasks-per-node (or --gpus-per-node)"
        )
    return max(counts.pop(), 1) if counts else 1


def rendezvous_port(job_id: str | int, restart: int = 0) -> int:
    """launch_env's port for the job, shifted per requeue (the range stays 15000-32767)."""
    base = port_for_job(job_id) - PORT_BASE
    return PORT_BASE + (base + 997 * restart) % PORT_SPAN


def step_command(
    style: str,
    command: Sequence[str],
    alloc: Allocation,
    *,
    python: Sequence[str],
    cpus_per_task: int | None = None,
    extra_srun_args: Sequence[str] = (),
) -> list[str]:
    """The whole `srun …` line of the training step; `command` is ds_train's (e.g. pretrain RUN.yaml …)."""
    if style not in STYLES:
        raise SlurmLaunchError(f"DS_TRAIN_LAUNCHER must be one of {', '.join(STYLES)}, got {style!r}")
    n = len(alloc.nodes)
    tasks_per_node = alloc.ranks_per_node if style == "srun" else 1
    if cpus_per_task is None and alloc.cpus_per_node:
        if alloc.cpus_per_node < tasks_per_node:
            raise SlurmLaunchError(
                f"the allocation has {alloc.cpus_per_node} CPU(s) per node for {tasks_per_node} ranks per node: "
                f"submit with --ntasks-per-node={tasks_per_node} (and --cpus-per-task), or --exclusive"
            )
        # srun gives each task one CPU unless told otherwise (and since Slurm 22.05 does not
        # inherit sbatch's --cpus-per-task): data-loader workers, or a per-node launcher's whole
        # family of processes, would all share it.
        cpus_per_task = alloc.cpus_per_node // tasks_per_node
    srun = [
        "srun",
        f"--nodes={n}",
        f"--ntasks={n * tasks_per_node}",
        f"--ntasks-per-node={tasks_per_node}",
        # Not --kill-on-bad-exit: ranks stop together with 75 after a checkpoint, and the first
        # to exit would get the others killed and their status replaced by 143. A rank that dies
        # alone ends the others through the collective timeout (run.collective_timeout_s).
        "--kill-on-bad-exit=0",
    ]
    if cpus_per_task:
        srun.append(f"--cpus-per-task={cpus_per_task}")
    srun += list(extra_srun_args)
    if style == "srun":
        return [*srun, *python, "-m", "ds_train", *command]
    return [
        *srun,
        *python,
        "-m",
        "ds_train",
        "slurm",
        "node-launch",
        f"--nproc-per-node={alloc.ranks_per_node}",
        style,
        "--",
        *command,
    ]


def node_command(
    style: str,
    nproc_per_node: int,
    command: Sequence[str],
    env: Mapping[str, str],
    *,
    python: str,
    accelerate_config: str,
) -> list[str]:
    """Inside one task per node: the torchrun / accelerate launch line for this node."""
    if "SLURM_NODEID" not in env:
        raise SlurmLaunchError("node-launch runs inside an srun task (SLURM_NODEID is unset)")
    nnodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    node_rank = int(env["SLURM_NODEID"])
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
    addr = env.get("MASTER_ADDR") or expand_hostlist(nodelist)[0]
    port = env.get("MASTER_PORT") or str(
        rendezvous_port(env.get("SLURM_JOB_ID", "0"), int(env.get("SLURM_RESTART_COUNT") or 0))
    )
    entry = ["-m", "ds_train", *command]
    if style == "torchrun":
        return [
            python,
            "-m",
            "torch.distributed.run",
            f"--nnodes={nnodes}",
            f"--node_rank={node_rank}",
            f"--nproc_per_node={nproc_per_node}",
            f"--master_addr={addr}",
            f"--master_port={port}",
            *entry,
        ]
    if style == "accelerate":
        return [
            python,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            accelerate_config,
            "--num_machines",
            str(nnodes),
            "--num_processes",
            str(nnodes * nproc_per_node),
            "--machine_rank",
            str(node_rank),
            "--main_process_ip",
            addr,
            "--main_process_port",
            str(port),
            *entry,
        ]
    raise SlurmLaunchError(f"node-launch style must be torchrun or accelerate, got {style!r}")


def split_words(value: str | None) -> list[str]:
    """An environment variable holding a command prefix or extra flags, split like a shell would."""
    return shlex.split(value) if value else []


def shell_assignments(values: Mapping[str, str | Sequence[str]]) -> str:
    """Bash for `eval`: scalars as `name=value`, sequences as arrays, everything quoted."""
    lines = []
    for name, value in values.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"not a shell variable name: {name}")
        if isinstance(value, str):
            lines.append(f"{name}={shlex.quote(value)}")
        else:
            lines.append(f"{name}=({' '.join(shlex.quote(v) for v in value)})")
    return "\n".join(lines) + "\n"
