"""Which launcher started this process, and the rank/world/master it implies.

One per-rank entry point serves every launcher:
- torchrun, `deepspeed`, `accelerate launch`: they export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*.
- `srun` (one task per GPU): rank from SLURM_PROCID, local rank from SLURM_LOCALID, world from
  SLURM_STEP_NUM_TASKS, master = first host of the step's node list, port derived from the job
  id so every task agrees without talking (Megatron's and gpt-neox's Slurm recipe, no ssh).
- nothing: a single process with a free local port.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from ds_train.config.loader import ConfigError


@dataclass(frozen=True)
class LaunchEnv:
    launcher: str  # "none" | "torchrun" | "deepspeed" | "accelerate" | "srun" | "env"
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def export(self) -> None:
        """Write the torch.distributed env:// variables for this process."""
        os.environ.update(
            {
                "RANK": str(self.rank),
                "LOCAL_RANK": str(self.local_rank),
                "WORLD_SIZE": str(self.world_size),
                "LOCAL_WORLD_SIZE": str(self.local_world_size),
                "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port),
            }
        )


def detect(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            launcher=_which_launcher(env),
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=int(env["WORLD_SIZE"]),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", env["WORLD_SIZE"]))),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
        )
    # SLURM_STEP_NUM_TASKS is set inside an srun step but not in the batch script itself, where
    # SLURM_NTASKS may be > 1 while only one process runs.
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        world = int(env["SLURM_STEP_NUM_TASKS"])
        tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1")
        return LaunchEnv(
            launcher="srun",
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            world_size=world,
            local_world_size=_first_count(tasks_per_node),
            master_addr=env.get("MASTER_ADDR") or expand_hostlist(nodelist)[0],
            master_port=int(env.get("MASTER_PORT") or port_for_job(env.get("SLURM_JOB_ID", "0"))),
        )
    return LaunchEnv("none", 0, 0, 1, 1, "127.0.0.1", free_port())


def _which_launcher(env: Mapping[str, str]) -> str:
    if any(k.startswith("ACCELERATE_") for k in env):
        return "accelerate"
    if "CROSS_RANK" in env or ("DS_ACCELERATOR" in env and "LOCAL_SIZE" in env):
        return "deepspeed"
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    return "env"


PORT_BASE, PORT_SPAN = 15000, 17768  # 15000-32767: below Linux's ephemeral ports (32768-60999),
# which outgoing connections take at random and could hold the rendezvous port


def port_for_job(job_id: str | int) -> int:
    """A port every task of a Slurm job derives alike: 15000 + job id mod 17768 (consecutive jobs,
    the likeliest to share a node, get different ports)."""
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return PORT_BASE + int(digits) % PORT_SPAN


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm hostlist like `gpu-[01-03,07],login1` into host names, in order."""
    hosts: list[str] = []
    for item in _split_top_level(hostlist):
        m = re.fullmatch(r"(.*?)\[([^\]]+)\](.*)", item)
        if not m:
            hosts.append(item)
            continue
        prefix, ranges, suffix = m.groups()
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{part}{suffix}")
    return hosts


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        current += ch
    if current:
        parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def _first_count(tasks_per_node: str) -> int:
    """`2(x3),1` → 2: tasks on the first node of the step."""
    m = re.match(r"(\d+)", tasks_per_node)
    return int(m.group(1)) if m else 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_for_check(world_size: int | None) -> LaunchEnv:
    """This process's launch, or (`--check --world-size N`) rank 0 of an N-rank one: what a
    login node checks a job's config against before submitting it."""
    launch = detect()
    if world_size is None:
        return launch
    if world_size < 1:
        raise ConfigError(f"--world-size must be ≥ 1, got {world_size}")
    return dataclasses.replace(launch, rank=0, local_rank=0, world_size=world_size)
