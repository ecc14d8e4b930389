"""slurm/pretrain.sbatch on the local two-node Slurm cluster: a multi-node ZeRO-3 run, preemption
with checkpoint → requeue → exact resume (srun and per-node torchrun styles), a signal that
reaches one rank only, and a crash loop (per-node accelerate) that stops requeueing."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from ds_train.checkpoint.layout import latest_checkpoint
from tests.helpers import REPO, base_config, read_metrics, train_losses, write_config

pytestmark = [pytest.mark.system, pytest.mark.slow]

STEPS = 40  # long enough (a few seconds of steps) to signal a running job mid-way
SCRIPT = REPO / "slurm" / "pretrain.sbatch"
JOB_TIMEOUT = 400


def _config(tmp: Path, shards: Path, name: str, *, data: dict | None = None, **train) -> tuple[Path, Path]:
    run = tmp / name
    cfg = base_config(run, shards, train={"max_steps": STEPS, **train}, zero={"stage": 3})
    cfg["data"].update(data or {})
    return run, write_config(tmp / f"{name}.yaml", cfg)


def _attempts(run: Path) -> list[dict]:
    path = run / "logs" / "slurm-attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _ends(run: Path) -> list[dict]:
    return [r for r in _attempts(run) if r["event"] == "end"]


def _log(run: Path, job: str, restart: int) -> str:
    return (run / "logs" / f"slurm-{job}-r{restart}.log").read_text()


def _wait_for_step(cluster, job: str, run: Path, step: int, timeout: float = JOB_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r.get("step", 0) >= step for r in read_metrics_safe(run)):
            return
        state = cluster.state(job)
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} is {state} before step {step}"
        time.sleep(0.2)
    raise AssertionError(f"job {job} did not reach step {step} in {timeout}s")


def read_metrics_safe(run: Path) -> list[dict]:
    try:
        return read_metrics(run)
    except (FileNotFoundError, json.JSONDecodeError):  # not created yet, or a line being written
        return []


@pytest.fixture(scope="module")
def reference(slurm_cluster, slurm_env, shards, tmp_path_factory):
    """One uninterrupted `sbatch -N 2 slurm/pretrain.sbatch` run: (job id, run dir, submit dir)."""
    tmp = tmp_path_factory.mktemp("slurm_reference")
    run, cfg = _config(tmp, shards, "reference")
    job = slurm_cluster.sbatch(["-N", "2", SCRIPT, cfg], env=slurm_env(), cwd=tmp)
    info = slurm_cluster.wait_finished(job, JOB_TIMEOUT)
    assert info["JobState"] == "COMPLETED", (info, _tail(run, slurm_cluster))
    return job, run, tmp


def _tail(run: Path, cluster) -> str:
    logs = sorted((run / "logs").glob("*.log")) if (run / "logs").is_dir() else []
    return "\n".join(p.read_text()[-4000:] for p in logs) + "\n" + cluster.logs()


def test_pretrain_two_nodes_zero3(reference, slurm_cluster):
    job, run, submit_dir = reference
    info = slurm_cluster.job(job)
    assert (info["NumNodes"], info["Restarts"]) == ("2", "0")
    # one rank per node: each slurmd launched (one task of) the training step, and there are 2 ranks
    for node in ("n1", "n2"):
        slurmd_log = (slurm_cluster.root / "log" / f"slurmd-{node}.log").read_text()
        assert f"launch task StepId={job}.0 " in slurmd_log, node
    log = _log(run, job, 0)
    assert "srun launch, 2 rank(s)" in log and "ZeRO-3" in log, log[-3000:]
    assert latest_checkpoint(run / "checkpoints").step == STEPS
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert {(r["world_size"], r["slurm_job_id"], r["slurm_restart_count"]) for r in records} == {(2, job, 0)}
    ends = _ends(run)
    assert [(e["exit_code"], e["requeue"], e["step"]) for e in ends] == [(0, False, STEPS)]
    # the Slurm output file says where the attempt's log went
    assert (
        str(run / "logs" / f"slurm-{job}-r0.log") in (submit_dir / f"slurm-ds-pretrain-{job}.out").read_text()
    )


@pytest.mark.parametrize(
    "launcher,scope,sig",
    [
        # only the batch shell (`scancel --signal=USR1 --batch`): it must pass the signal on
        ("srun", "--batch", "USR1"),
        # only the step's processes, the batch shell not: what `--signal=USR1@grace` does before
        # the time limit; torchrun turns the workers' 75 into 1, so progress decides the requeue
        ("torchrun", "--steps-only", "USR1"),
        # SIGTERM to every process of the step, as preemption sends it (then SIGKILL after
        # KillWait): torchrun, the ranks and their DataLoader workers, which must keep serving the
        # ranks finishing their step to checkpoint (torch's workers die of SIGTERM by default)
        ("torchrun", "--steps-only", "TERM"),
    ],
)
def test_preemption_checkpoints_requeues_and_resumes_exactly(
    reference, slurm_cluster, slurm_env, shards, tmp_path, launcher, scope, sig
):
    _, ref_run, _ = reference
    # DataLoader workers (the default) where the signal reaches every process; the reference reads
    # in-process, which must not change what is trained
    workers = {"num_workers": 1} if scope == "--steps-only" else None
    run, cfg = _config(tmp_path, shards, "preempted", data=workers)
    job = slurm_cluster.sbatch(
        ["-N", "2", SCRIPT, cfg], env=slurm_env(DS_TRAIN_LAUNCHER=launcher), cwd=tmp_path
    )
    _wait_for_step(slurm_cluster, job, run, 3)
    slurm_cluster.scancel(f"--signal={sig}", *([scope] if scope != "--steps-only" else []), job)

    # The first attempt checkpoints where it stopped and the batch script requeues the job.
    slurm_cluster.wait_until(job, lambda j: j.get("Restarts") == "1", JOB_TIMEOUT, "a requeue")
    first = _ends(run)[0]
    stop_step = first["step"]
    assert first["requeue"] and first["signal"] == (sig if scope == "--batch" else None), first
    assert 3 <= stop_step < STEPS, first
    # the trainer's status passes through srun; torchrun reports its workers' failure as 1
    assert first["exit_code"] == (75 if launcher == "srun" else 1), first
    assert latest_checkpoint(run / "checkpoints").step == stop_step
    assert f"stopped at step {stop_step} (SIG{sig}) after checkpointing" in _log(run, job, 0)

    info = slurm_cluster.wait_finished(job, JOB_TIMEOUT)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), (info, _tail(run, slurm_cluster))
    assert f"resuming at step {stop_step}" in _log(run, job, 1)
    starts = [r for r in _attempts(run) if r["event"] == "start"]
    assert [(s["restart"], s["step"]) for s in starts] == [(0, None), (1, stop_step)]
    assert [(e["exit_code"], e["requeue"]) for e in _ends(run)][1] == (0, False)
    assert latest_checkpoint(run / "checkpoints").step == STEPS

    records = [r for r in read_metrics(run) if "loss" in r]
    # every step exactly once: nothing repeated, nothing skipped
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["slurm_restart_count"] for r in records] == [0] * stop_step + [1] * (STEPS - stop_step)
    assert {r["slurm_job_id"] for r in records} == {job}
    # the same data and the same state at every step as the uninterrupted run
    expected, got = train_losses(ref_run), train_losses(run)
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=0), f"step {step}"


def _rank_pid(job: str, rank: int, timeout: float = 60) -> int:
    """The pid of one srun task (training rank) of `job`: every "node" is this machine."""
    want = {f"SLURM_JOB_ID={job}".encode(), f"SLURM_PROCID={rank}".encode(), b"SLURM_STEP_ID=0"}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
                if b"ds_train" not in cmdline or b"pretrain" not in cmdline:
                    continue
                if want <= set((proc / "environ").read_bytes().split(b"\0")):
                    return int(proc.name)
            except (OSError, ValueError):
                continue
        time.sleep(0.2)
    raise AssertionError(f"no rank {rank} process of job {job}")


def test_signal_to_one_rank_stops_every_rank_at_the_same_step(slurm_cluster, slurm_env, shards, tmp_path):
    """Only rank 1 (on n2) gets SIGUSR1, as when one node's warning comes first: both ranks agree
    at the next step boundary, write one complete checkpoint and exit 75; the job requeues."""
    run, cfg = _config(tmp_path, shards, "one_rank")
    job = slurm_cluster.sbatch(["-N", "2", SCRIPT, cfg], env=slurm_env(), cwd=tmp_path)
    _wait_for_step(slurm_cluster, job, run, 3)
    os.kill(_rank_pid(job, 1), signal.SIGUSR1)

    slurm_cluster.wait_until(job, lambda j: j.get("Restarts") == "1", JOB_TIMEOUT, "a requeue")
    first = _ends(run)[0]
    stop_step = first["step"]
    # the batch shell saw no signal; both ranks exited 75 (srun reports the highest status)
    assert (first["exit_code"], first["signal"], first["requeue"]) == (75, None, True), first
    assert 3 <= stop_step < STEPS, first
    assert latest_checkpoint(run / "checkpoints").step == stop_step
    # rank 0 (which logs) stopped because the other rank asked, at the same step
    log = _log(run, job, 0)
    assert f"stopped at step {stop_step} (another rank received a stop signal) after checkpointing" in log, (
        log[-3000:]
    )
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, stop_step + 1))
    # resuming is covered above: end the requeued attempt here
    slurm_cluster.scancel(job)
    slurm_cluster.wait_finished(job, JOB_TIMEOUT)


def test_crash_loop_stops_requeueing(slurm_cluster, slurm_env, shards, tmp_path):
    """Every rank is killed at step 3, before any checkpoint, in every attempt; launched with one
    `accelerate launch` per node (the third launch style, which the other tests do not run)."""
    run, cfg = _config(tmp_path, shards, "crashing", max_steps=6)
    env = slurm_env(DS_TRAIN_FAULT="kill@step=3", DS_TRAIN_MAX_FAILURES="2", DS_TRAIN_LAUNCHER="accelerate")
    job = slurm_cluster.sbatch(["-N", "2", SCRIPT, cfg], env=env, cwd=tmp_path)
    info = slurm_cluster.wait_finished(job, JOB_TIMEOUT)
    # killed at step 3 before any checkpoint, twice: requeued once, then given up
    assert (info["JobState"], info["Restarts"]) == ("FAILED", "1"), (info, _tail(run, slurm_cluster))
    ends = _ends(run)
    assert [(e["restart"], e["requeue"], e["failures"], e["step"]) for e in ends] == [
        (0, True, 1, None),
        (1, False, 2, None),
    ]
    assert all(e["exit_code"] not in (0, 75) for e in ends)
    assert "giving up" in ends[-1]["reason"]
    assert "giving up" in _log(run, job, 1)
    assert latest_checkpoint(run / "checkpoints") is None
    # both attempts trained across the two nodes under accelerate until the fault
    for restart in (0, 1):
        assert "accelerate launch, 2 rank(s)" in _log(run, job, restart)
        steps = [r["step"] for r in read_metrics(run) if "loss" in r and r["slurm_restart_count"] == restart]
        assert steps[:2] == [1, 2] and max(steps) <= 3, steps
