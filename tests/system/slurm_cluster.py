"""A real two-node Slurm cluster on this machine, for the system tests.

`munged` with a generated key, one `slurmctld` and two `slurmd` (`-N n1`, `-N n2`) started from
one slurm.conf written under a temporary directory, all in the foreground as child processes of
the test run so teardown ends exactly them. Both "nodes" are this host (NodeAddr=127.0.0.1 with a
port each); `n1`/`n2` must resolve, so /etc/hosts gets an entry when it lacks one (root only).

Nothing here touches the system's own Slurm or munge configuration: clients find this cluster
through SLURM_CONF in `env()`, which the tests pass to every sbatch/squeue/scontrol they run.

`unavailable()` says why a cluster cannot be started (no daemons, not root), so tests skip with
that reason instead of failing.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

NODES = ("n1", "n2")
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo")
FINISHED_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


class ClusterError(RuntimeError):
    pass


def unavailable() -> str | None:
    """Why a local cluster cannot be started here, or None when it can."""
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if missing:
        return f"Slurm/munge not installed ({', '.join(missing)} missing; tests/setup_system_packages.sh installs them)"
    if os.geteuid() != 0:
        return "starting slurmd needs root (it runs job steps as the submitting user)"
    return None


def _free_port_pair() -> int:
    """A port p with p and p+1 free: the two slurmd ports are declared as one range."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port > 64000:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise ClusterError("no pair of free consecutive ports")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_hosts_entry(names: tuple[str, ...] = NODES, hosts: Path = Path("/etc/hosts")) -> None:
    """Make the node names resolve to 127.0.0.1 (srun and the rendezvous look them up)."""
    missing = []
    for name in names:
        try:
            socket.gethostbyname(name)
        except OSError:
            missing.append(name)
    if missing:
        with open(hosts, "a") as fh:
            fh.write(f"\n127.0.0.1 {' '.join(missing)}  # ds_train system tests (local Slurm nodes)\n")


class SlurmCluster:
    """Start with `start()`, stop with `stop()`; `env()` is the environment for Slurm clients."""

    def __init__(self, root: Path, *, cpus_per_node: int = 1):
        self.root = Path(root)
        self.cpus_per_node = cpus_per_node
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._procs: dict[str, subprocess.Popen] = {}

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> SlurmCluster:
        ensure_hosts_entry()
        self._start_munge()
        self._write_conf()
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait_for(
            lambda: self._run(["scontrol", "ping"], check=False).returncode == 0, timeout, "slurmctld"
        )
        for node in NODES:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._wait_for(self._nodes_idle, timeout, "both nodes idle")
        return self

    def stop(self) -> None:
        # Jobs first (their steps are children of slurmd), then the daemons in reverse start order.
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self._run(["scancel", "--user", "root"], check=False)
            deadline = time.monotonic() + 30  # steps are slurmstepd's children, not ours: let them end
            while time.monotonic() < deadline and self._run(["squeue", "-h"], check=False).stdout.strip():
                time.sleep(0.5)
        for name in reversed(list(self._procs)):
            proc = self._procs[name]
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        self._procs.clear()

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- clients --------------------------------------------------------------------------------

    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def sbatch(self, args: list[str], *, env: dict | None = None, cwd: Path | None = None) -> str:
        proc = self._run(["sbatch", "--parsable", *map(str, args)], env=env, cwd=cwd)
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (the job must still be known to slurmctld: MinJobAge)."""
        out = self._run(["scontrol", "show", "job", "-o", str(job_id)], check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def state(self, job_id: str) -> str:
        return self.job(job_id).get("JobState", "UNKNOWN")

    def wait_until(self, job_id: str, predicate, timeout: float, what: str) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if predicate(info):
                return info
            self._check_daemons()
            time.sleep(0.5)
        raise ClusterError(
            f"timed out after {timeout:.0f}s waiting for job {job_id}: {what}; last {self.job(job_id)}"
        )

    def wait_finished(self, job_id: str, timeout: float) -> dict[str, str]:
        return self.wait_until(
            job_id, lambda j: j.get("JobState") in FINISHED_STATES, timeout, "a finished state"
        )

    def scontrol(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self._run(["scontrol", *args], check=check)

    def scancel(self, *args: str) -> subprocess.CompletedProcess:
        return self._run(["scancel", *args])

    def logs(self) -> str:
        """Tails of the daemon logs, for failure messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*.log")):
            parts.append(
                f"--- {path.name} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:])
            )
        return "\n".join(parts)

    # --- internals ------------------------------------------------------------------------------

    def _start_munge(self) -> None:
        mdir = self.munge_socket.parent
        mdir.mkdir(parents=True, exist_ok=True)
        mdir.chmod(0o700)
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        (self.root / "log").mkdir(exist_ok=True)
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={mdir / 'munged.pid'}",
                f"--seed-file={mdir / 'munged.seed'}",
                f"--log-file={self.root / 'log' / 'munged.log'}",
            ],
        )
        self._wait_for(self.munge_socket.exists, 20, "munged socket")

    def _write_conf(self) -> None:
        for sub in ("etc", "state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        port = _free_port_pair()
        host = socket.gethostname()
        r = self.root
        self.conf.write_text(
            f"""# written by tests/system/slurm_cluster.py
ClusterName=dstrain
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={self.munge_socket},cred_expire=5
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=10
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=20
NodeName={",".join(NODES)} NodeHostname={host} NodeAddr=127.0.0.1 Port={port}-{port + 1} CPUs={self.cpus_per_node} State=UNKNOWN
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        self._procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=self.root, start_new_session=True
        )
        log.close()

    def _run(
        self, cmd: list[str], *, env: dict | None = None, cwd: Path | None = None, check: bool = True
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            cmd, env=self.env(env), cwd=cwd, capture_output=True, text=True, timeout=60, check=False
        )
        if check and proc.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def _nodes_idle(self) -> bool:
        out = self._run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        return all(states.get(n) == "idle" for n in NODES)

    def _check_daemons(self) -> None:
        dead = [name for name, p in self._procs.items() if p.poll() is not None]
        if dead:
            raise ClusterError(f"Slurm daemon(s) exited: {', '.join(dead)}\n{self.logs()}")

    def _wait_for(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            self._check_daemons()
            time.sleep(0.3)
        raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs()}")
