"""What the Slurm batch scripts decide and run, without a cluster: the requeue decision and its
attempt log, the srun / per-node launcher lines and their rendezvous, the shard array's task
split, and the scripts themselves (syntax, #SBATCH lines, every knob documented)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from ds_train.checkpoint.layout import LATEST, STATE_FILE, checkpoints_dir, tag_for_step
from ds_train.config import ConfigError
from ds_train.distributed.requeue import (
    AttemptLog,
    checkpoint_step,
    decide,
    max_failures_from_env,
)
from ds_train.distributed.slurm_array import ArrayTask, merge_argv, task_argv
from ds_train.distributed.slurm_launch import (
    Allocation,
    SlurmLaunchError,
    node_command,
    rendezvous_port,
    step_command,
)
from tests.helpers import REPO

SLURM = REPO / "slurm"


# --- the requeue decision -------------------------------------------------------------------------


def _decide(exit_code, start, end, *, signal=None, before=0, max_failures=3):
    return decide(
        exit_code=exit_code,
        signal=signal,
        start_step=start,
        end_step=end,
        failures_before=before,
        max_failures=max_failures,
    )


def test_finished_or_misconfigured_or_cancelled_jobs_do_not_requeue():
    assert not _decide(0, 10, 40).requeue  # finished
    assert not _decide(0, None, None).requeue
    assert not _decide(2, None, None).requeue  # a config error: requeueing cannot fix it
    cancelled = _decide(75, 10, 20, signal="TERM")  # the batch shell got SIGTERM: scancel / preemption
    assert not cancelled.requeue and "SIGTERM" in cancelled.reason
    interrupted = _decide(130, 10, 20)  # checkpointed on Ctrl-C (an interactive srun): its user stopped it
    assert not interrupted.requeue and "Ctrl-C" in interrupted.reason


def test_checkpointed_stop_or_crash_with_progress_requeues_and_resets_the_count():
    d = _decide(75, 10, 20, signal="USR1", before=2)
    assert (d.requeue, d.failures) == (True, 0)
    d = _decide(75, None, 5)  # first attempt, first checkpoint
    assert (d.requeue, d.failures) == (True, 0)
    d = _decide(1, 10, 20)  # a crash after a newer checkpoint (torchrun turns 75 into 1, too)
    assert (d.requeue, d.failures) == (True, 0)


def test_no_progress_requeues_until_max_failures():
    assert [_decide(137, 10, 10, before=b, max_failures=3).requeue for b in range(4)] == [
        True,
        True,
        False,
        False,
    ]
    last = _decide(137, None, None, before=1, max_failures=2)
    assert (last.requeue, last.failures) == (False, 2) and "giving up" in last.reason
    # a preemption that never reaches a new checkpoint (time limit < start-up + grace) counts too
    assert not _decide(75, 10, 10, signal="USR1", before=2, max_failures=3).requeue


def test_max_failures_from_the_environment():
    assert max_failures_from_env({}) == 3
    assert max_failures_from_env({"DS_TRAIN_MAX_FAILURES": "7"}) == 7
    for bad in ("0", "-1", "x"):
        with pytest.raises(ConfigError, match="DS_TRAIN_MAX_FAILURES"):
            max_failures_from_env({"DS_TRAIN_MAX_FAILURES": bad})


def _complete_checkpoint(run, step):
    """A complete checkpoint as checkpoint/layout.py defines one (state file + `latest`)."""
    cdir = checkpoints_dir(run)
    (cdir / tag_for_step(step)).mkdir(parents=True)
    (cdir / tag_for_step(step) / STATE_FILE).write_text("{}")
    (cdir / LATEST).write_text(tag_for_step(step))


def test_attempt_log_counts_failures_per_job(tmp_path):
    log = AttemptLog(tmp_path)
    assert log.log_file("81", 2) == tmp_path / "logs" / "slurm-81-r2.log"
    log.start("81", 0)
    assert log.running_job() == "81"
    assert log.finish("81", 0, exit_code=137, signal=None, max_failures=2).requeue
    # requeued, so pending again: still the run directory's job (another job used to be let in)
    assert log.running_job() == "81"
    log.start("81", 1)
    stop = log.finish("81", 1, exit_code=137, signal=None, max_failures=2)
    assert (stop.requeue, stop.failures) == (False, 2)
    assert log.running_job() is None
    # the user fixes the crash and resubmits: a new job starts with a clean slate
    log.start("90", 0)
    assert log.finish("90", 0, exit_code=137, signal=None, max_failures=2).requeue
    records = log.records()
    assert [(r["event"], r["job_id"], r["restart"]) for r in records] == [
        ("start", "81", 0),
        ("end", "81", 0),
        ("start", "81", 1),
        ("end", "81", 1),
        ("start", "90", 0),
        ("end", "90", 0),
    ]
    # a line cut by a crash mid-write does not block the next attempt
    with open(log.path, "a") as fh:
        fh.write('{"event": "sta')
    assert len(log.records()) == 6


def test_attempt_log_sees_progress_through_checkpoints(tmp_path):
    _complete_checkpoint(tmp_path, 10)
    assert checkpoint_step(tmp_path) == 10
    log = AttemptLog(tmp_path)
    assert log.start("5", 0)["step"] == 10
    _complete_checkpoint(tmp_path, 20)
    d = log.finish("5", 0, exit_code=75, signal="USR1", max_failures=1)
    assert d.requeue and "progress to step 20" in d.reason
    assert log.records()[-1] | {"time": None} == {
        "event": "end",
        "job_id": "5",
        "restart": 0,
        "start_step": 10,
        "step": 20,
        "exit_code": 75,
        "signal": "USR1",
        "failures": 0,
        "requeue": True,
        "reason": d.reason,
        "time": None,
    }


# --- launch lines and rendezvous ------------------------------------------------------------------


def _alloc(**env) -> Allocation:
    base = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-[07-08],gpu-10", "SLURM_CPUS_ON_NODE": "96"}
    return Allocation.from_env({**base, **env})


def test_allocation_from_the_batch_environment():
    a = _alloc(SLURM_GPUS_PER_NODE="h100:8", SLURM_RESTART_COUNT="2")
    assert a.nodes == ("gpu-07", "gpu-08", "gpu-10")
    assert (a.master_addr, a.ranks_per_node, a.world_size, a.restart) == ("gpu-07", 8, 24, 2)
    assert _alloc(SLURM_GPUS_ON_NODE="4").ranks_per_node == 4  # --gres=gpu:4
    assert _alloc(SLURM_NTASKS_PER_NODE="2").ranks_per_node == 2  # CPU-only
    # `sbatch -n 6` alone sets only SLURM_TASKS_PER_NODE (it used to give 1 rank per node, silently)
    assert _alloc(SLURM_TASKS_PER_NODE="2(x3)").ranks_per_node == 2
    assert _alloc(SLURM_TASKS_PER_NODE="1(x3)").ranks_per_node == 1
    with pytest.raises(SlurmLaunchError, match=r"SLURM_TASKS_PER_NODE=3,2\(x2\).*--ntasks-per-node"):
        _alloc(SLURM_TASKS_PER_NODE="3,2(x2)")
    assert _alloc(DS_TRAIN_GPUS_PER_NODE="2", SLURM_GPUS_PER_NODE="8").ranks_per_node == 2
    with pytest.raises(SlurmLaunchError):
        _alloc(DS_TRAIN_GPUS_PER_NODE="many")
    with pytest.raises(SlurmLaunchError, match="sbatch"):
        Allocation.from_env({})


def test_rendezvous_port_is_derived_from_the_job_and_moves_per_requeue():
    ports = [rendezvous_port("4242", r) for r in range(50)]
    assert all(15000 <= p < 32768 for p in ports)  # below Linux's ephemeral ports
    assert len(set(ports)) == 50  # a requeued attempt never meets the last attempt's port
    assert rendezvous_port("4242", 0) == rendezvous_port(4242, 0) != rendezvous_port("4243", 0)
    assert _alloc(SLURM_RESTART_COUNT="1").master_port == rendezvous_port("4242", 1)


def test_srun_style_runs_one_task_per_gpu():
    a = _alloc(SLURM_GPUS_PER_NODE="8")
    cmd = step_command("srun", ["pretrain", "/r.yaml", "train.max_steps=9"], a, python=["py"])
    assert cmd[: cmd.index("py")] == [
        "srun",
        "--nodes=3",
        "--ntasks=24",
        "--ntasks-per-node=8",
        "--kill-on-bad-exit=0",
        "--cpus-per-task=12",
    ]
    assert cmd[cmd.index("py") :] == ["py", "-m", "ds_train", "pretrain", "/r.yaml", "train.max_steps=9"]
    # site flags and a container's Python go where srun and the task expect them
    cmd = step_command(
        "srun",
        ["finetune", "/r.yaml"],
        a,
        python=["apptainer", "exec", "--nv", "i.sif", "python"],
        cpus_per_task=4,
        extra_srun_args=["--container-image=x"],
    )
    assert "--cpus-per-task=4" in cmd and cmd.index("--container-image=x") < cmd.index("apptainer")


@pytest.mark.parametrize("style", ["torchrun", "accelerate"])
def test_per_node_styles_run_one_launcher_per_node(style):
    a = _alloc(SLURM_GPUS_PER_NODE="8")
    cmd = step_command(style, ["pretrain", "/r.yaml"], a, python=["py"])
    assert "--ntasks=3" in cmd and "--ntasks-per-node=1" in cmd and "--cpus-per-task=96" in cmd
    assert cmd[cmd.index("py") :] == [
        "py",
        "-m",
        "ds_train",
        "slurm",
        "node-launch",
        "--nproc-per-node=8",
        style,
        "--",
        "pretrain",
        "/r.yaml",
    ]


def test_node_launch_reads_the_node_rank_inside_the_task():
    env = {
        "SLURM_NODEID": "2",
        "SLURM_STEP_NUM_NODES": "3",
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_NODELIST": "gpu-[07-08],gpu-10",
    }
    tr = node_command("torchrun", 8, ["pretrain", "/r.yaml"], env, python="py", accelerate_config="a.yaml")
    assert tr == [
        "py",
        "-m",
        "torch.distributed.run",
        "--nnodes=3",
        "--node_rank=2",
        "--nproc_per_node=8",
        "--master_addr=gpu-07",
        f"--master_port={rendezvous_port('4242', 0)}",
        "-m",
        "ds_train",
        "pretrain",
        "/r.yaml",
    ]
    acc = node_command(
        "accelerate",
        8,
        ["pretrain", "/r.yaml"],
        {**env, "MASTER_PORT": "20001"},
        python="py",
        accelerate_config="a.yaml",
    )
    flags = dict(zip(acc[5:-4:2], acc[6:-4:2]))
    assert acc[:5] == ["py", "-m", "accelerate.commands.launch", "--config_file", "a.yaml"]
    assert {k: flags[k] for k in ("--num_machines", "--num_processes", "--machine_rank")} == {
        "--num_machines": "3",
        "--num_processes": "24",
        "--machine_rank": "2",
    }
    assert (flags["--main_process_ip"], flags["--main_process_port"]) == ("gpu-07", "20001")
    assert acc[-4:] == ["-m", "ds_train", "pretrain", "/r.yaml"]
    with pytest.raises(SlurmLaunchError, match="SLURM_NODEID"):
        node_command("torchrun", 8, ["pretrain"], {}, python="py", accelerate_config="a.yaml")


def test_too_few_cpus_for_the_ranks_is_refused():
    with pytest.raises(SlurmLaunchError, match="ntasks-per-node"):
        step_command(
            "srun", ["pretrain", "r"], _alloc(SLURM_GPUS_PER_NODE="8", SLURM_CPUS_ON_NODE="4"), python=["p"]
        )
    with pytest.raises(SlurmLaunchError, match="DS_TRAIN_LAUNCHER"):
        step_command("mpirun", ["pretrain", "r"], _alloc(), python=["p"])


# --- the shard array ------------------------------------------------------------------------------


def _task(task_id, lo, hi, count, step=None, **extra):
    env = {
        "SLURM_ARRAY_JOB_ID": "77",
        "SLURM_ARRAY_TASK_ID": str(task_id),
        "SLURM_ARRAY_TASK_MIN": str(lo),
        "SLURM_ARRAY_TASK_MAX": str(hi),
        "SLURM_ARRAY_TASK_COUNT": str(count),
        **({"SLURM_ARRAY_TASK_STEP": str(step)} if step else {}),
        **extra,
    }
    return ArrayTask.from_env(env)


def test_array_task_index_is_the_position_in_the_array():
    assert ArrayTask.from_env({}) is None  # not an array: the merge
    assert _task(5, 4, 7, 4) == ArrayTask("77", 1, 4, is_first=False)
    assert _task(4, 4, 7, 4).is_first
    assert _task(6, 0, 6, 4, step=2) == ArrayTask("77", 3, 4, is_first=False)
    with pytest.raises(ValueError, match="one range"):
        _task(3, 0, 9, 3)  # --array=0,3,9: not one range
    # a partial rerun of an 8-task array: the id is the index, and no second merge is submitted
    assert _task(3, 3, 5, 2, DS_TRAIN_SHARD_NUM_TASKS="8") == ArrayTask("77", 3, 8, is_first=False)
    with pytest.raises(ValueError, match="outside"):
        _task(9, 9, 9, 1, DS_TRAIN_SHARD_NUM_TASKS="8")


def test_array_task_and_merge_arguments():
    args = ["corpus/a.jsonl", "--output", "out", "--tokenizer", "tok", "--seq-len", "64", "--no-progress"]
    task = ArrayTask("77", 1, 3, is_first=False)
    assert task_argv(args, task, {"SLURM_CPUS_PER_TASK": "8"}) == [
        "shard",
        *args,
        "--task-index",
        "1",
        "--num-tasks",
        "3",
        "--workers",
        "8",
    ]
    assert task_argv([*args, "--workers", "2"], task, {"SLURM_CPUS_PER_TASK": "8"})[-2:] == [
        "--num-tasks",
        "3",
    ]
    with pytest.raises(ValueError, match="sets --task-index"):
        task_argv([*args, "--task-index", "0"], task, {})
    assert merge_argv(args, {}) == ["shard", "--merge", "--output", "out", "--no-progress"]


# --- the scripts ----------------------------------------------------------------------------------

TRAINING_SCRIPTS = ["pretrain.sbatch", "finetune.sbatch"]
ALL_SCRIPTS = [*TRAINING_SCRIPTS, "convert.sbatch", "shard_array.sbatch", "train_job.sh", "env.sh"]


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_scripts_parse(name):
    proc = subprocess.run(["bash", "-n", str(SLURM / name)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", TRAINING_SCRIPTS)
def test_training_scripts_ask_for_the_warning_signal_and_requeue(name):
    directives = re.findall(r"^#SBATCH\s+(\S+)", (SLURM / name).read_text(), re.M)
    assert "--requeue" in directives and "--open-mode=append" in directives
    assert any(re.fullmatch(r"--signal=USR1@\d+", d) for d in directives), directives
    assert not any(d.startswith("--signal=B:") for d in directives)  # the step itself must get it


def test_every_knob_is_documented_in_the_readme():
    readme = (SLURM / "README.md").read_text()
    sources = [*(SLURM / n for n in ALL_SCRIPTS), REPO / "ds_train" / "cli" / "slurm.py"]
    sources += [
        REPO / "ds_train" / "distributed" / n for n in ("slurm_launch.py", "slurm_array.py", "requeue.py")
    ]
    knobs = set()
    for path in sources:
        knobs |= set(re.findall(r"\bDS_TRAIN_[A-Z_]+[A-Z]\b", path.read_text()))
    internal = {"DS_TRAIN_ACCELERATE_CONFIG", "DS_TRAIN_SBATCH_SCRIPT"}  # set by the scripts themselves
    missing = sorted(k for k in knobs - internal if k not in readme)
    assert not missing, f"slurm/README.md does not mention {missing}"
    for script in ("pretrain.sbatch", "finetune.sbatch", "convert.sbatch", "shard_array.sbatch"):
        assert script in readme


def test_the_batch_script_refuses_to_run_outside_slurm(tmp_path):
    """prepare needs the job's allocation: a bare `bash slurm/pretrain.sbatch` says so and stops."""
    cfg = tmp_path / "r.yaml"
    cfg.write_text(
        f"run: {{output_dir: {tmp_path / 'run'}}}\nmodel: {{config: {REPO}/configs/model/micro-llama.json}}\n"
    )
    env = {"PATH": "/usr/bin:/bin", "DS_TRAIN_PYTHON": sys.executable, "HOME": str(tmp_path)}
    proc = subprocess.run(
        ["bash", str(SLURM / "pretrain.sbatch"), str(cfg)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "SLURM_JOB_ID" in proc.stderr, proc.stderr


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_prepare_prints_bash_the_batch_script_can_eval(tmp_path, command):
    """`ds-train slurm prepare` as train_job.sh uses it: the srun line survives `eval` word for word
    (an override with spaces and quotes included), the attempt's log is named after the job and
    requeue count, and the attempt's start is recorded."""
    run = tmp_path / "run dir"
    cfg = tmp_path / "r.yaml"
    cfg.write_text(
        f"run: {{output_dir: '{run}'}}\nmodel: {{config: {REPO}/configs/model/micro-llama.json}}\n"
    )
    override = 'run.name=it\'s a "run"'
    env = {
        "PATH": "/usr/bin:/bin",
        "SLURM_JOB_ID": "777",
        "SLURM_RESTART_COUNT": "2",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_CPUS_ON_NODE": "8",
        "DS_TRAIN_PYTHON": sys.executable,
        "DS_TRAIN_SRUN_ARGS": "--exclusive --comment='a b'",
    }
    script = (
        f'eval "$({sys.executable} -m ds_train slurm prepare {command} "$1" "$2")" || exit 9\n'
        'printf "%s\\n" "$run_dir" "$log" "$MASTER_ADDR" "$MASTER_PORT" "$summary" "${step_cmd[@]}"\n'
    )
    proc = subprocess.run(
        ["bash", "-c", script, "bash", str(cfg), override], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:4] == [
        str(run),
        str(run / "logs" / "slurm-777-r2.log"),
        "n1",
        str(rendezvous_port("777", 2)),
    ]
    assert lines[4].endswith("no checkpoint yet: starts from step 0")
    assert lines[5:] == [
        "srun",
        "--nodes=2",
        "--ntasks=4",
        "--ntasks-per-node=2",
        "--kill-on-bad-exit=0",
        "--cpus-per-task=4",
        "--exclusive",
        "--comment=a b",
        sys.executable,
        "-m",
        "ds_train",
        command,
        str(cfg),
        override,
    ]
    (start,) = AttemptLog(run).records()
    assert (start["event"], start["job_id"], start["restart"], start["step"], start["command"]) == (
        "start",
        "777",
        2,
        None,
        command,
    )
    # a bad DS_TRAIN_MAX_FAILURES is refused before the attempt starts, not after training, when
    # the requeue decision needs it (a preempted job was then not requeued)
    bad = subprocess.run(
        [sys.executable, "-m", "ds_train", "slurm", "prepare", command, str(cfg)],
        capture_output=True,
        text=True,
        env={**env, "DS_TRAIN_MAX_FAILURES": "five"},
        cwd=REPO,
    )
    assert bad.returncode == 2 and "DS_TRAIN_MAX_FAILURES must be a positive integer" in bad.stderr
    assert len(AttemptLog(run).records()) == 1  # no second start recorded
    # a branch (run.start_from) says where it starts until it has a checkpoint of its own
    branch = subprocess.run(
        ["bash", "-c", script, "bash", str(cfg), f"run.start_from={tmp_path / 'base'}"],
        capture_output=True, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    assert branch.returncode == 0, branch.stderr
    assert branch.stdout.splitlines()[4].endswith(
        f"no checkpoint of its own yet: branches off {tmp_path / 'base'}"
    )


def test_the_merge_job_keeps_the_users_sbatch_defaults(tmp_path, monkeypatch):
    """The shard array's merge job is submitted from inside an array task: it drops the task's own
    SLURM_ARRAY_* / SLURM_JOB_* identity, but keeps the user's SBATCH_* defaults (QoS, time limit),
    which it used to drop, so a site requiring a QoS rejected the merge."""
    import ds_train.distributed.slurm_array as slurm_array

    seen = {}

    def fake_sbatch(cmd, env, **kwargs):
        seen.update(cmd=cmd, env=env)
        return subprocess.CompletedProcess(cmd, 0, stdout="991;cluster\n", stderr="")

    monkeypatch.setattr(slurm_array.subprocess, "run", fake_sbatch)
    env = {
        "DS_TRAIN_SBATCH_SCRIPT": "slurm/shard_array.sbatch",
        "SLURM_ARRAY_TASK_ID": "0",
        "SLURM_JOB_ID": "990",
        "SBATCH_QOS": "high",
        "SBATCH_TIMELIMIT": "00:07:00",
        "SBATCH_ARRAY_INX": "0-1",
        "PATH": "/usr/bin",
    }
    task = slurm_array.ArrayTask("990", 0, 2, True)
    job = slurm_array.submit_merge_once(["docs.jsonl", "--output", str(tmp_path / "out")], task, env)
    assert job == "991" and "--dependency=afterok:990" in seen["cmd"]
    assert {k: seen["env"].get(k) for k in ("SBATCH_QOS", "SBATCH_TIMELIMIT", "PATH")} == {
        "SBATCH_QOS": "high",
        "SBATCH_TIMELIMIT": "00:07:00",
        "PATH": "/usr/bin",
    }
    assert not {"SLURM_ARRAY_TASK_ID", "SLURM_JOB_ID", "SBATCH_ARRAY_INX"} & set(seen["env"])


@pytest.mark.parametrize("name", TRAINING_SCRIPTS)
def test_a_signal_before_the_step_starts_is_held_and_requeues(tmp_path, name):
    """`scancel --signal=USR1 -b` in the first second of a job, while `slurm prepare` runs: the batch
    shell used to die of it (no trap yet), and the job ended FAILED, unrequeued. It now skips the
    step and reports a checkpointed stop (exit 75 with the signal) to the requeue decision. A
    stand-in Python plays `prepare` (signalling the batch shell as it runs) and `finish`."""
    calls = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/bash\n"
        f'echo "$*" >> {calls}\n'
        'case "$*" in\n'
        '  *"slurm prepare"*) kill -USR1 "$BATCH_PID"; sleep 0.2\n'
        f'    echo "run_dir={tmp_path}; log={tmp_path}/attempt.log; summary=s; step_cmd=(touch {tmp_path}/step-ran)" ;;\n'
        '  *"slurm finish"*) echo stop ;;\n'
        "esac\n"
    )
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "DS_TRAIN_PYTHON": str(fake), "SLURM_JOB_ID": "5"}
    proc = subprocess.run(
        ["bash", "-c", f"export BATCH_PID=$$; exec bash {SLURM / name} run.yaml"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 75, proc.stdout + proc.stderr
    assert not (tmp_path / "step-ran").exists()
    finish = calls.read_text().splitlines()[-1]
    assert "slurm finish" in finish and "--exit-code 75 --signal USR1" in finish
    assert "got SIGUSR1 before the training step started" in (tmp_path / "attempt.log").read_text()


def test_a_ranks_exit_2_is_not_requeued_when_the_launcher_reports_1(tmp_path, monkeypatch):
    """torchrun / accelerate turn a worker's exit 2 (bad config or data) into their own 1, which the
    decision counted as a crash: requeued DS_TRAIN_MAX_FAILURES times. The rank now leaves its
    error in the attempt's user-error file (the CLI does, for any exit 2), and the attempt is an
    exit 2."""
    from ds_train.cli import main
    from ds_train.distributed.requeue import USER_ERROR_FILE_ENV

    log = AttemptLog(tmp_path)
    log.start("61", 0)
    assert log.finish("61", 0, exit_code=1, signal=None, max_failures=3).requeue  # a crash
    log.start("62", 0)
    monkeypatch.setenv(USER_ERROR_FILE_ENV, str(log.user_error_file("62", 0)))
    monkeypatch.setenv("RANK", "3")
    assert main(["pretrain", str(tmp_path / "missing.yaml")]) == 2
    assert "[rank 3]" in log.user_error_file("62", 0).read_text()
    decision = log.finish("62", 0, exit_code=1, signal=None, max_failures=3)
    assert not decision.requeue and "config or data error" in decision.reason
    end = log.records()[-1]
    assert (end["exit_code"], end["launcher_exit_code"]) == (2, 1)


@pytest.mark.parametrize(
    ("env", "args", "expected"),
    [
        ({}, ["r.yaml", "a=1"], "r.yaml|a=1"),
        ({"DS_TRAIN_CONFIG": "e.yaml"}, [], "e.yaml|"),
        # DS_TRAIN_CONFIG with overrides as arguments: the first override was taken as the config
        ({"DS_TRAIN_CONFIG": "e.yaml"}, ["a=1", "b=2"], "e.yaml|a=1 b=2"),
        # DS_TRAIN_OVERRIDES was dropped whenever arguments carried overrides
        ({"DS_TRAIN_CONFIG": "e.yaml", "DS_TRAIN_OVERRIDES": "c='x y'"}, ["a=1"], "e.yaml|c=x y a=1"),
        ({"DS_TRAIN_CONFIG": "e.yaml", "DS_TRAIN_OVERRIDES": "c=3"}, ["r.yaml", "a=1"], "r.yaml|c=3 a=1"),
    ],
)
def test_config_and_overrides_from_arguments_and_environment(tmp_path, env, args, expected):
    """train_job.sh's arguments, read up to `slurm prepare` (a stand-in Python that prints them)."""
    fake = tmp_path / "python"
    fake.write_text(
        '#!/bin/bash\nshift 5; IFS=" "; echo "$1|${*:2}" >&2; exit 7\n'
    )  # -m ds_train slurm prepare CMD
    fake.chmod(0o755)
    proc = subprocess.run(
        ["bash", str(SLURM / "pretrain.sbatch"), *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "DS_TRAIN_PYTHON": str(fake), **env},
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 7 and proc.stderr.strip().splitlines()[-1] == expected, proc.stderr
