"""Shared test helpers: run the CLI in subprocesses (alone or under a launcher), read results."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "configs" / "tokenizers" / "stdlib-bpe-4k"
MICRO_LLAMA = REPO / "configs" / "model" / "micro-llama.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_on_gloo_ranks(fn, world: int, *args) -> None:
    """Run `fn(rank, world, *args)` on `world` spawned processes joined in one gloo group (the
    OLMo-core way to test collectives on CPU). `fn` must be a module-level function; an exception
    on any rank fails the call with that rank's traceback."""
    import torch.multiprocessing as mp

    mp.spawn(_gloo_rank, args=(world, free_port(), fn, args), nprocs=world, join=True)


def _gloo_rank(rank: int, world: int, port: int, fn, args: tuple) -> None:
    import torch.distributed as dist

    from ds_train.distributed.engine import shutdown
    from ds_train.distributed.process_exit import exit_process

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    fn(rank, world, *args)
    shutdown(wait_for_peers=True)
    exit_process(0)  # as ds-train leaves: no interpreter teardown to abort in


def clean_env(extra: dict | None = None) -> dict:
    """The test process's environment without launcher variables that would leak into children."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"}
        and not k.startswith(("SLURM_", "ACCELERATE_", "TORCHELASTIC_"))
    }
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_cli(
    args: list[str], *, env: dict | None = None, timeout: int = 600, check: bool = True, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "ds_train", *map(str, args)],
        cwd=cwd,
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"ds-train {' '.join(map(str, args))} exited {proc.returncode}\n"
            f"--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


def torchrun_command(module: str, args: list, nproc: int = 2) -> list[str]:
    """`python -m torch.distributed.run` of `python -m module args` on `nproc` local ranks."""
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    return [*launcher, f"--master_port={free_port()}", "-m", module, *map(str, args)]


def torchrun(
    args: list[str], *, nproc: int = 2, env: dict | None = None, timeout: int = 600, check: bool = True
) -> subprocess.CompletedProcess:
    cmd = torchrun_command("ds_train", args, nproc)
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"torchrun ds-train {' '.join(map(str, args))} exited {proc.returncode}\n"
            f"--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


def kill_job(launcher: subprocess.Popen) -> None:
    """SIGKILL a launcher started with `start_new_session=True` and everything it started, as Slurm
    does at the end of KillWait. torchrun gives each rank a session of its own, so each process
    group is killed whole: the rank, and the ninja and compilers of an op it was building."""
    import signal

    import psutil

    procs = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
    groups = set()
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(proc.pid))
    for group in groups - {os.getpgrp()}:  # never the test's own group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)
    launcher.wait()


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def base_config(run_dir: Path, shards: Path, **sections) -> dict:
    """A tiny causal-LM run config over the test shards; `sections` update it per section."""
    cfg = {
        "run": {"output_dir": str(run_dir), "seed": 7, "tensorboard": False},
        "model": {"config": str(MICRO_LLAMA), "tokenizer": str(TOKENIZER)},
        "data": {"train": str(shards / "train"), "num_workers": 0},
        "train": {
            "max_steps": 6,
            "global_batch_size": 8,
            "micro_batch_size": 2,
            "lr": 1e-3,
            "warmup_steps": 2,
            "log_every": 1,
            "save_every": 0,
            "precision": "fp32",
        },
        "zero": {"stage": 2},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def file_digests(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path."""
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def state_only_checkpoint(cfg_file: Path, step: int, **state) -> Path:
    """A checkpoint of the run `cfg_file` describes holding only its ds_train_state.json (the
    model's signature and tokenizer recorded, plus `state`), made `latest`: enough for the checks
    a start makes before it loads anything. Returns its directory."""
    from ds_train.checkpoint.compat import model_signature
    from ds_train.checkpoint.layout import tag_for_step
    from ds_train.config import load_config
    from ds_train.data.shard_format import tokenizer_fingerprint
    from ds_train.model.build import load_hf_config, load_tokenizer

    cfg = load_config(cfg_file)
    tokenizer = load_tokenizer(cfg.model)
    ckpt = Path(cfg.run.output_dir) / "checkpoints" / tag_for_step(step)
    ckpt.mkdir(parents=True)
    full = {
        "step": step,
        "model_config": model_signature(load_hf_config(cfg.model, tokenizer)),
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer)["sha256"],
        **state,
    }
    (ckpt / "ds_train_state.json").write_text(json.dumps(full))
    (ckpt.parent / "latest").write_text(ckpt.name)
    return ckpt
