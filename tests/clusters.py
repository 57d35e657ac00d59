"""Real local clusters for tests: Slurm (slurmctld + slurmd from Debian's packages) and Ray.

Nothing is installed here: .ci/run installs the packages. Daemons are started in the foreground as
our children and stopped by PID.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


SLURM_CONF = """\
ClusterName=distembed
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
KillWait=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    def __init__(self, root: Path):
        self.root = root
        (root / "state").mkdir(parents=True)
        (root / "spool").mkdir()
        self.conf = root / "slurm.conf"
        self.conf.write_text(SLURM_CONF.format(root=root, ctld_port=free_port(), slurmd_port=free_port()))
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.procs: list[subprocess.Popen] = []

    def start(self) -> "LocalSlurm":
        for exe in ("slurmctld", "slurmd"):
            args = [exe, "-D", "-f", str(self.conf)] + (["-c", "-i"] if exe == "slurmctld" else [])
            self.procs.append(subprocess.Popen(args, env=self.env, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL, start_new_session=True))
        deadline = time.time() + 60
        while time.time() < deadline:
            r = self.run("sinfo", "-h", "-o", "%T", check=False)
            if r.returncode == 0 and r.stdout.strip() in ("idle", "mixed", "allocated"):
                return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"Slurm did not come up: {self.logs()}")

    def run(self, *cmd, check=True) -> subprocess.CompletedProcess:
        r = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60)
        if check and r.returncode:
            raise RuntimeError(f"{cmd}: {r.stderr}")
        return r

    def state(self, job: str) -> str:
        r = self.run("scontrol", "show", "job", job, "-o", check=False)
        for part in r.stdout.split():
            if part.startswith("JobState="):
                return part.split("=", 1)[1]
        return "UNKNOWN"

    def wait(self, job: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout=300) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = self.state(job)
            if s in states:
                return s
            time.sleep(0.5)
        raise TimeoutError(f"job {job} still {self.state(job)}; {self.logs()}")

    def logs(self) -> str:
        return "".join((self.root / f).read_text()[-3000:] for f in ("slurmctld.log", "slurmd.log")
                       if (self.root / f).exists())

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def slurm_available() -> bool:
    return all(shutil.which(x) for x in ("slurmctld", "slurmd", "sbatch", "scontrol"))


class LocalRay:
    """A one-node Ray cluster on 127.0.0.2 (Ray rewrites 127.0.0.1 to the external address)."""

    def __init__(self, root: Path, cpus: int = 2):
        self.root, self.cpus = root, cpus
        self.port = free_port("127.0.0.2")
        self.ray = str(Path(os.__file__).parent)  # unused; kept for clarity of what runs where
        import sys

        self.exe = str(Path(sys.executable).parent / "ray")
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS="0")

    @property
    def address(self) -> str:
        return f"127.0.0.2:{self.port}"

    def start(self) -> "LocalRay":
        subprocess.run([self.exe, "start", "--head", "--node-ip-address", "127.0.0.2", "--port", str(self.port),
                        "--num-cpus", str(self.cpus), "--include-dashboard=false", "--disable-usage-stats",
                        "--temp-dir", str(self.root)], env=self.env, check=True, capture_output=True, timeout=180)
        return self

    def stop(self) -> None:
        subprocess.run([self.exe, "stop", "--force"], env=self.env, capture_output=True, timeout=120)
