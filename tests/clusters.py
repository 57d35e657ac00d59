"""Real local clusters for tests: Slurm (slurmctld + slurmd from Debian's packages) and Ray, on this
machine's loopback (one node) or on the nodes of a ``netns.NetnsCluster`` (one slurmd / raylet each).

Nothing is installed here: .ci/run installs the packages. Every helper stops only what it started:
Slurm's daemons run in the foreground as our children and are stopped by PID; a Ray cluster's
processes are the ones that carry its own temporary directory in their command line (or, on
namespace nodes, every process of those nodes).
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
SlurmctldHost={head}
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
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
KillWait=30
{nodes}
PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    """slurmctld and one slurmd per node: this machine as the one node ``localhost``, or the nodes of
    a ``NetnsCluster`` (slurmctld on node0; clients run there too: ``run``, ``command``)."""

    def __init__(self, root: Path, cluster=None):
        self.root, self.cluster = root, cluster
        (root / "state").mkdir(parents=True)
        nodes = [(n.host, n.addr) for n in cluster.nodes] if cluster else [("localhost", "127.0.0.1")]
        self.names = [name for name, _ in nodes]
        self.conf = root / "slurm.conf"
        # in namespaces every node has its own addresses, so the ports need only be free on none
        ports = (6817, 6818) if cluster else (free_port(), free_port())
        self.conf.write_text(SLURM_CONF.format(
            root=root, ctld_port=ports[0], slurmd_port=ports[1], head=f"{nodes[0][0]}({nodes[0][1]})",
            nodes="\n".join(f"NodeName={n} NodeAddr={a} CPUs={os.cpu_count() or 1} State=UNKNOWN" for n, a in nodes),
            names=",".join(self.names)))
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.procs: list[subprocess.Popen] = []

    def command(self, cmd: list, node: int = 0) -> list[str]:
        """``cmd`` as run on node ``node`` (the head by default): clients talk to slurmctld from there."""
        cmd = [str(c) for c in cmd]
        return self.cluster.command(self.cluster.nodes[node], cmd) if self.cluster else cmd

    def start(self) -> "LocalSlurm":
        self._spawn(["slurmctld", "-D", "-f", str(self.conf), "-c", "-i"], 0)
        for i, name in enumerate(self.names):
            self._spawn(["slurmd", "-D", "-f", str(self.conf), "-N", name], i)
        deadline = time.time() + 60
        while time.time() < deadline:
            r = self.run("sinfo", "-h", "-o", "%T", check=False)
            states = r.stdout.split()
            if r.returncode == 0 and len(states) >= 1 and all(s in ("idle", "mixed", "allocated") for s in states) \
                    and self._nodes_up() == len(self.names):
                return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"Slurm did not come up: {self.logs()}")

    def _nodes_up(self) -> int:
        r = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
        return sum(1 for line in r.stdout.splitlines() if line.split()[1:2] and line.split()[1] == "idle")

    def _spawn(self, args: list[str], node: int) -> None:
        self.procs.append(subprocess.Popen(self.command(args, node), env=self.env, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, start_new_session=True))

    def run(self, *cmd, check=True, node: int = 0) -> subprocess.CompletedProcess:
        r = subprocess.run(self.command(list(cmd), node), env=self.env, capture_output=True, text=True, timeout=60)
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
        files = ["slurmctld.log"] + [f"slurmd-{n}.log" for n in self.names]
        return "".join((self.root / f).read_text()[-3000:] for f in files if (self.root / f).exists())

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def slurm_available() -> bool:
    return all(shutil.which(x) for x in ("slurmctld", "slurmd", "sbatch", "scontrol"))


# Ray 2.60 turns token authentication on for `ray start --head` whenever ~/.ray/auth_token exists
# (a local ray.init() writes one) and never for a client given an address: state it for every part
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "RAY_AUTH_MODE": "disabled"}


def session_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[3])
    except (OSError, IndexError, ValueError):
        return None


def kill_session(sid: int, timeout: float = 20) -> None:
    """SIGKILL every process of session ``sid`` (again, while a dying raylet still starts some)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        pids = [int(e) for e in os.listdir("/proc") if e.isdigit() and session_of(int(e)) == sid]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


class LocalRay:
    """A Ray cluster: one node on 127.0.0.2 (Ray rewrites 127.0.0.1 to the external address), or the
    head on node0 of a ``NetnsCluster`` and a worker raylet on each other node (``cpus`` each).

    ``ray start`` runs in a session of its own, and every daemon and worker it starts stays in it:
    ``stop`` ends that session's processes, never another Ray on this machine (``ray stop`` would)."""

    def __init__(self, root: Path, cpus: int = 2, cluster=None, stray_token: Path | None = None):
        """``stray_token``: a token file the head finds with no mode stated (so Ray turns token mode
        on, as it does for ~/.ray/auth_token); the other nodes state token mode to join it."""
        import sys

        self.root, self.cpus, self.cluster, self.stray_token = Path(root), cpus, cluster, stray_token
        self.head_ip = cluster.nodes[0].addr if cluster else "127.0.0.2"
        self.port = 6379 if cluster else free_port("127.0.0.2")
        self.exe = str(Path(sys.executable).parent / "ray")
        self.env = dict(os.environ, **RAY_ENV)
        if stray_token is not None:
            self.env.pop("RAY_AUTH_MODE")
            self.env["RAY_AUTH_TOKEN_PATH"] = str(stray_token)
        self.sessions: list[int] = []

    @property
    def address(self) -> str:
        return f"{self.head_ip}:{self.port}"

    def command(self, cmd: list, node: int = 0) -> list[str]:
        cmd = [str(c) for c in cmd]
        return self.cluster.command(self.cluster.nodes[node], cmd) if self.cluster else cmd

    def _ray_start(self, node: int, *args: str) -> None:
        temp = self.root / f"node{node}"  # every node its own (the filesystem is shared)
        p = subprocess.Popen(self.command([self.exe, "start", "--num-cpus", str(self.cpus), "--disable-usage-stats",
                                           "--temp-dir", str(temp), *args], node),
                             env=dict(self.env, RAY_AUTH_MODE="token") if node and self.stray_token else self.env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.sessions.append(p.pid)
        out, _ = p.communicate(timeout=180)
        if p.returncode:
            self.stop()
            raise RuntimeError(f"ray start on node {node}: {out[-3000:]}")

    def start(self) -> "LocalRay":
        self._ray_start(0, "--head", "--node-ip-address", self.head_ip, "--port", str(self.port),
                        "--include-dashboard=false")
        for node in range(1, len(self.cluster.nodes) if self.cluster else 1):
            self._ray_start(node, "--address", self.address, "--node-ip-address", self.cluster.nodes[node].addr)
        return self

    def stop(self) -> None:
        for sid in self.sessions:
            kill_session(sid)
